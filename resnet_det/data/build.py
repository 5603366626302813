"""Data loaders: an infinite, resumable training loader and a sharded test loader.

Batches are ``(images, targets)``: ``images`` a list of ``float32 [3, H, W]`` tensors (sizes may
differ; the model batches/pads them), ``targets`` a list of target dicts (see
:class:`resnet_det.data.coco.CocoDetection`).

**Determinism.** The training stream depends only on ``seed``, the rank/world size and the
dataset, not on ``num_workers``:

* batch composition comes from :class:`~resnet_det.data.samplers.GroupedBatchSampler`
  (epoch permutation seeded with ``seed + epoch``);
* every sample carries its own augmentation seed, derived from ``(seed, rank, batch number,
  slot in batch)``; if ``dataset.transforms`` has ``set_seed`` (as
  :class:`~resnet_det.data.transforms.DetectionTransforms` does), it is called before the sample
  is loaded; otherwise ``random``/``numpy``/``torch`` are seeded with it inside workers;
* ``worker_init_fn`` also seeds ``random``, ``numpy`` and ``torch`` in each worker from
  ``(seed, rank, worker id)`` for any other randomness.

**Resumption.** :class:`TrainLoader` counts the batches it has handed to the training loop; its
``state_dict()`` is the sampler state after exactly those batches (not after what workers
prefetched). Save it with the checkpoint and call ``load_state_dict()`` on a new loader built with
the same arguments: iteration continues with the very next batch, augmentations included.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .coco import record_unreadable
from .samplers import GroupedBatchSampler, InferenceSampler, default_rank_world_size

logger = logging.getLogger(__name__)

__all__ = ["TrainLoader", "build_test_loader", "build_train_loader", "collate", "sample_seed"]

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> Batch:
    """Keeps images and targets as lists (images of different sizes are not stacked).

    Args:
        batch: ``(image [3, H, W], target)`` pairs.

    Returns:
        ``(images, targets)``, two lists of the same length, in batch order.
    """
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def sample_seed(seed: int, rank: int, batch: int, slot: int) -> int:
    """Augmentation seed of the sample in ``slot`` of the ``batch``-th batch (1-based) of ``rank``."""
    return int(np.random.SeedSequence([seed, rank, batch, slot]).generate_state(1)[0])


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _WorkerInit:
    """Picklable ``worker_init_fn``: seeds random/numpy/torch from (seed, rank, worker id)."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank

    def __call__(self, worker_id: int) -> None:
        _seed_globals(int(np.random.SeedSequence([self.seed, self.rank, worker_id]).generate_state(1)[0]))


class _SeededDataset(Dataset):
    """Dataset wrapper taking ``(index, sample_seed)`` keys; seeds the transforms per sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        transforms = getattr(self.dataset, "transforms", None)
        if transforms is not None and hasattr(transforms, "set_seed"):
            transforms.set_seed(seed)
        elif get_worker_info() is not None:
            _seed_globals(seed)
        return self.dataset[index]


class _SeededBatches:
    """Batch sampler wrapper attaching a per-sample seed to every index."""

    def __init__(self, sampler: GroupedBatchSampler, seed: int, rank: int, first_batch: int) -> None:
        self.sampler, self.seed, self.rank, self.first_batch = sampler, seed, rank, first_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n = self.first_batch
        for batch in self.sampler:
            n += 1
            yield [(i, sample_seed(self.seed, self.rank, n, j)) for j, i in enumerate(batch)]


def _count_batches(loader: DataLoader, counter: list[int], dataset: Dataset) -> Generator[Batch, None, None]:
    for batch in loader:
        counter[0] += 1
        record_unreadable(dataset, batch[1])  # images the workers skipped, into the dataset's report
        yield batch


class _TestLoader(DataLoader):
    """A DataLoader whose batches' skipped-image markers are counted in the dataset's report (main process)."""

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        for batch in super().__iter__():
            record_unreadable(self.dataset, batch[1])
            yield batch


class TrainLoader:
    """Infinite training loader with exact resumption.

    Iterate it (``for images, targets in loader``) forever; ``len()`` is undefined. Re-iterating
    continues after the last batch the previous iteration handed out.

    Attributes:
        batch_sampler: The :class:`GroupedBatchSampler`.
        consumed_batches: Batches handed to the training loop since training began (after a
            ``load_state_dict``, counting the batches before the checkpoint). A batch counts as
            consumed when the iterator returns it.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler: GroupedBatchSampler,
        *,
        num_workers: int,
        seed: int,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.num_workers = num_workers
        self.seed = seed
        self.rank = batch_sampler.rank
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self._counter = [int(batch_sampler.state_dict()["batches"])]
        self._active: Generator[Batch, None, None] | None = None

    def _make_loader(self) -> DataLoader:
        start = self.consumed_batches
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.rank)
        return DataLoader(
            _SeededDataset(self.dataset),
            batch_sampler=_SeededBatches(self.batch_sampler, self.seed, self.rank, start),
            collate_fn=collate,
            num_workers=self.num_workers,
            worker_init_fn=_WorkerInit(self.seed, self.rank) if self.num_workers > 0 else None,
            pin_memory=self.pin_memory,
            generator=generator,
            **kwargs,
        )

    @property
    def consumed_batches(self) -> int:
        """Batches handed to the training loop since training began."""
        return self._counter[0]

    def close(self) -> None:
        """Stops the running iteration and shuts its worker processes down (also done by a new
        ``iter()`` or ``load_state_dict()``, or when the iterator is garbage collected)."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        if self.batch_sampler.state_dict()["batches"] != self.consumed_batches:
            # An earlier iteration ran ahead (prefetch): continue after what was consumed.
            self.batch_sampler.load_state_dict(self.batch_sampler.state_dict(self.consumed_batches))
        # The generator must not reference ``self``: a self <-> generator cycle would leave worker
        # processes to the cyclic garbage collector, which shuts them down late and slowly.
        self._active = _count_batches(self._make_loader(), self._counter, self.dataset)
        return self._active

    def state_dict(self) -> dict[str, Any]:
        """``{"sampler": <GroupedBatchSampler state after the consumed batches>}``, plain ints."""
        return {"sampler": self.batch_sampler.state_dict(consumed_batches=self.consumed_batches)}

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = False) -> None:
        """Continues after the batches recorded in ``state``; stops a running iteration (its
        workers are shut down), so call ``iter()`` again afterwards.

        The continuation is exact when the loader was built with the same arguments (seed, batch
        size, rank, world size, dataset); otherwise see :meth:`GroupedBatchSampler.load_state_dict`
        (approximate continuation with a warning, or an error with ``strict``).

        Raises:
            ValueError: The state does not fit this loader's sampler.
        """
        if not isinstance(state, dict) or "sampler" not in state:
            raise ValueError("TrainLoader.load_state_dict: expected a dict from TrainLoader.state_dict()")
        self.close()
        self.batch_sampler.load_state_dict(state["sampler"], strict=strict)
        self._counter[0] = int(state["sampler"]["batches"])


def build_train_loader(
    dataset: Dataset,
    *,
    images_per_batch: int,
    num_workers: int,
    seed: int,
    aspect_grouping: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
) -> TrainLoader:
    """Infinite, resumable, deterministic training loader.

    Args:
        dataset: Map-style dataset of ``(image, target)``; with ``aspect_grouping`` it must have
            ``aspect_ratios()`` (as :class:`~resnet_det.data.coco.CocoDetection`).
        images_per_batch: **Total** images per iteration over all processes (detectron2's
            ``IMS_PER_BATCH``); each process loads ``images_per_batch // world_size``.
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: Seed of the sampling and augmentation streams (same on every rank).
        aspect_grouping: Batch images of the same orientation (``w >= h`` / ``w < h``) together.
        rank: Default from ``torch.distributed`` if initialised, else 0.
        world_size: Default from ``torch.distributed`` if initialised, else 1.
        pin_memory: Passed to the DataLoader.

    Returns:
        A :class:`TrainLoader` yielding ``(list[Tensor [3, H, W]], list[dict])`` forever.

    Raises:
        ValueError: ``images_per_batch`` not a positive multiple of ``world_size``, negative
            ``num_workers``, or grouping requested for a dataset without ``aspect_ratios()``.
    """
    rank, world_size = default_rank_world_size(rank, world_size)
    if images_per_batch <= 0 or images_per_batch % world_size:
        raise ValueError(
            f"images_per_batch={images_per_batch} must be a positive multiple of world_size={world_size} "
            "(it is the total over all processes)"
        )
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if aspect_grouping:
        ratios: Callable[[], Sequence[float]] | None = getattr(dataset, "aspect_ratios", None)
        if ratios is None:
            raise ValueError(
                f"aspect_grouping=True needs dataset.aspect_ratios(); {type(dataset).__name__} has none "
                "(pass aspect_grouping=False)"
            )
        aspect_ratios = list(ratios())
    else:
        aspect_ratios = [1.0] * len(dataset)  # type: ignore[arg-type]
    sampler = GroupedBatchSampler(
        aspect_ratios,
        images_per_batch // world_size,
        seed=seed,
        group=aspect_grouping,
        rank=rank,
        world_size=world_size,
    )
    return TrainLoader(dataset, sampler, num_workers=num_workers, seed=seed, pin_memory=pin_memory)


def build_test_loader(
    dataset: Dataset,
    *,
    batch_size: int = 1,
    num_workers: int,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """Finite loader over this rank's contiguous shard of ``dataset``, in order, each image once.

    Args:
        dataset: Map-style dataset of ``(image, target)``.
        batch_size: Images per batch (the last batch may be smaller).
        num_workers: DataLoader worker processes.
        rank: Default from ``torch.distributed`` if initialised, else 0.
        world_size: Default from ``torch.distributed`` if initialised, else 1.

    Returns:
        A DataLoader yielding ``(list[Tensor [3, H, W]], list[dict])``; gather the per-rank results
        to evaluate the whole set (see :class:`~resnet_det.data.samplers.InferenceSampler`).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sampler = InferenceSampler(len(dataset), rank=rank, world_size=world_size)  # type: ignore[arg-type]
    return _TestLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=False,
    )
