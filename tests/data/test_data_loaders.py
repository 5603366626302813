"""Loaders: collate, deterministic worker-independent augmentation, resume with prefetching workers,
sharded test loader."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from resnet_det.data.build import TrainLoader, build_test_loader, build_train_loader, collate
from resnet_det.data.transforms import build_transforms


class ToyDataset(Dataset):
    """Random images of two orientations; one box each; optional DetectionTransforms."""

    def __init__(self, n: int = 24, transforms: Any = None) -> None:
        self.n = n
        self.transforms = transforms

    def __len__(self) -> int:
        return self.n

    def size(self, i: int) -> tuple[int, int]:
        return (24, 36) if i % 3 else (36, 24)

    def aspect_ratios(self) -> list[float]:
        return [self.size(i)[1] / self.size(i)[0] for i in range(self.n)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        h, w = self.size(i)
        image = np.random.default_rng(i).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        target: dict[str, Any] = {"boxes": np.array([[2.0, 3.0, 12.0, 15.0]], np.float32),
                                  "labels": np.array([1]), "image_id": i}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255,
                {**target, "boxes": torch.as_tensor(target["boxes"])})


class GlobalRandomDataset(ToyDataset):
    """Uses global numpy randomness (no set_seed): seeded per sample inside workers."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return torch.zeros(3, 2, 2), {"image_id": i, "noise": float(np.random.rand())}


def fingerprint(batch: tuple[list[torch.Tensor], list[dict]]) -> list[tuple]:
    images, targets = batch
    return [(t["image_id"], tuple(img.shape), round(float(img.sum()), 3), tuple(t["boxes"].flatten().tolist()))
            for img, t in zip(images, targets)]


def augmenting() -> ToyDataset:
    return ToyDataset(transforms=build_transforms(training=True, min_size=(20, 28, 40), max_size=80, seed=0))


def test_collate_keeps_lists() -> None:
    a, b = (torch.zeros(3, 4, 5), {"image_id": 1}), (torch.ones(3, 6, 2), {"image_id": 2})
    images, targets = collate([a, b])
    assert isinstance(images, list) and isinstance(targets, list)
    assert [i.shape for i in images] == [(3, 4, 5), (3, 6, 2)] and [t["image_id"] for t in targets] == [1, 2]


def test_batches_are_grouped_and_sized() -> None:
    ds = augmenting()
    loader = build_train_loader(ds, images_per_batch=4, num_workers=0, seed=0)
    for images, targets in itertools.islice(loader, 10):
        assert len(images) == len(targets) == 4
        assert len({ds.aspect_ratios()[t["image_id"]] >= 1 for t in targets}) == 1


def test_stream_does_not_depend_on_num_workers() -> None:
    runs = []
    for workers in (0, 2):
        loader = build_train_loader(augmenting(), images_per_batch=4, num_workers=workers, seed=5)
        runs.append([fingerprint(b) for b in itertools.islice(loader, 6)])
    assert runs[0] == runs[1]
    other = build_train_loader(augmenting(), images_per_batch=4, num_workers=0, seed=6)
    assert [fingerprint(b) for b in itertools.islice(other, 6)] != runs[0]


def test_resume_with_prefetching_workers_continues_exactly() -> None:
    n, m = 7, 5
    straight = build_train_loader(augmenting(), images_per_batch=4, num_workers=0, seed=1)
    expected = [fingerprint(b) for b in itertools.islice(straight, n + m)]

    first = build_train_loader(augmenting(), images_per_batch=4, num_workers=2, seed=1)
    it = iter(first)
    head = [fingerprint(next(it)) for _ in range(n)]
    state = first.state_dict()
    # the workers prefetched beyond what the loop consumed; the state is what was consumed
    assert state["sampler"]["batches"] == n
    assert first.batch_sampler.state_dict()["batches"] > n
    del it

    second = build_train_loader(augmenting(), images_per_batch=4, num_workers=2, seed=1)
    second.load_state_dict(state)
    tail = [fingerprint(b) for b in itertools.islice(second, m)]
    assert head + tail == expected
    assert second.consumed_batches == n + m and second.state_dict()["sampler"]["batches"] == n + m


def test_reiterating_continues_after_consumed_batches() -> None:
    expected = [fingerprint(b) for b in itertools.islice(build_train_loader(
        augmenting(), images_per_batch=2, num_workers=0, seed=2), 8)]
    loader = build_train_loader(augmenting(), images_per_batch=2, num_workers=1, seed=2)
    got = [fingerprint(b) for b in itertools.islice(loader, 3)]
    got += [fingerprint(b) for b in itertools.islice(loader, 5)]  # a new iter() continues
    assert got == expected


def test_global_randomness_is_seeded_per_sample_in_workers() -> None:
    runs = []
    for workers in (1, 2):
        loader = build_train_loader(GlobalRandomDataset(), images_per_batch=3, num_workers=workers, seed=0,
                                    aspect_grouping=False)
        runs.append([[t["noise"] for t in b[1]] for b in itertools.islice(loader, 4)])
    assert runs[0] == runs[1]
    flat = [v for batch in runs[0] for v in batch]
    assert len(set(flat)) == len(flat)  # samples do not repeat each other's random numbers


def test_total_batch_is_split_over_ranks() -> None:
    loader = build_train_loader(augmenting(), images_per_batch=8, num_workers=0, seed=0, rank=1, world_size=2)
    assert isinstance(loader, TrainLoader)
    assert loader.batch_sampler.batch_size == 4 and loader.batch_sampler.rank == 1
    images, _ = next(iter(loader))
    assert len(images) == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(images_per_batch=6, world_size=4, rank=0), "multiple of world_size"),
        (dict(images_per_batch=0), "positive multiple"),
        (dict(images_per_batch=2, num_workers=-1), "num_workers"),
    ],
)
def test_train_loader_bad_arguments(kwargs: dict, match: str) -> None:
    kwargs.setdefault("num_workers", 0)
    with pytest.raises(ValueError, match=match):
        build_train_loader(augmenting(), seed=0, **kwargs)


def test_grouping_needs_aspect_ratios() -> None:
    class NoRatios(Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> Any:
            return torch.zeros(3, 2, 2), {}

    with pytest.raises(ValueError, match="aspect_ratios"):
        build_train_loader(NoRatios(), images_per_batch=1, num_workers=0, seed=0)
    loader = build_train_loader(NoRatios(), images_per_batch=1, num_workers=0, seed=0, aspect_grouping=False)
    assert len(next(iter(loader))[0]) == 1


def test_test_loader_shards_in_order_without_duplicates() -> None:
    ds = ToyDataset(n=11)
    seen = []
    for rank in range(3):
        loader = build_test_loader(ds, batch_size=2, num_workers=0, rank=rank, world_size=3)
        for images, targets in loader:
            assert 1 <= len(images) <= 2
            seen += [t["image_id"] for t in targets]
    assert seen == list(range(11))
