"""GroupedBatchSampler: determinism, grouping, sharding, exact resumption; InferenceSampler."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from resnet_det.data.samplers import GroupedBatchSampler, InferenceSampler


def ratios(n: int = 53) -> list[float]:
    """Mixed landscape (4:3) and portrait (3:4) images, irregular pattern."""
    return [4 / 3 if (i * 7) % 5 < 3 else 3 / 4 for i in range(n)]


def flat(batches: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(batches))


def take(sampler: GroupedBatchSampler, n: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), n))


def test_same_seed_same_batches_different_seed_differs() -> None:
    a = take(GroupedBatchSampler(ratios(), 4, seed=1), 40)
    b = take(GroupedBatchSampler(ratios(), 4, seed=1), 40)
    c = take(GroupedBatchSampler(ratios(), 4, seed=2), 40)
    assert a == b
    assert a != c


def test_batches_have_one_orientation_and_the_right_size() -> None:
    r = ratios()
    for batch in take(GroupedBatchSampler(r, 5, seed=0), 60):
        assert len(batch) == 5
        assert len({r[i] >= 1 for i in batch}) == 1
    mixed = take(GroupedBatchSampler(r, 5, seed=0, group=False), 60)
    assert any(len({r[i] >= 1 for i in batch}) == 2 for batch in mixed)


def test_square_images_are_in_the_landscape_group() -> None:
    sampler = GroupedBatchSampler([1.0, 0.5, 2.0], 1, seed=0)
    assert sampler.group_ids == [0, 1, 0]


def test_stream_is_infinite_and_never_drops_an_image() -> None:
    n, bs, epochs = 53, 4, 6
    counts = Counter(i for batch in take(GroupedBatchSampler(ratios(n), bs, seed=0), epochs * n // bs) for i in batch)
    assert set(counts) == set(range(n))
    # leftovers wait in their bucket for the next epoch, so no image is seen more than one extra time
    assert set(counts.values()) <= {epochs - 1, epochs, epochs + 1}


def test_ungrouped_epoch_is_a_permutation() -> None:
    n = 48
    batches = take(GroupedBatchSampler([1.0] * n, 6, seed=9, group=False), 2 * n // 6)
    first, second = sorted(flat(batches[:8])), sorted(flat(batches[8:]))
    assert first == list(range(n)) == second
    assert flat(batches[:8]) != flat(batches[8:])  # epochs are reshuffled (seed + epoch)


def test_ranks_get_disjoint_parts_of_each_epoch() -> None:
    n, world = 53, 3
    per_rank = [take(GroupedBatchSampler(ratios(n), 1, seed=4, rank=r, world_size=world), 60) for r in range(world)]
    shard_len = [len(range(r, n, world)) for r in range(world)]
    epoch0 = [flat(b[: shard_len[r]]) for r, b in enumerate(per_rank)]
    epoch1 = [flat(b[shard_len[r] : 2 * shard_len[r]]) for r, b in enumerate(per_rank)]
    for epoch in (epoch0, epoch1):
        sets = [set(e) for e in epoch]
        assert sum(len(s) for s in sets) == n and set.union(*sets) == set(range(n))  # disjoint cover
    assert epoch0 != epoch1
    # with grouping and bigger batches, the first batches of each rank still come from disjoint shards
    bs = 4
    first = []
    for r in range(world):
        m = (shard_len[r] - 2 * (bs - 1)) // bs
        first.append(set(flat(take(GroupedBatchSampler(ratios(n), bs, seed=4, rank=r, world_size=world), m))))
    assert not (first[0] & first[1]) and not (first[0] & first[2]) and not (first[1] & first[2])


def test_rank_and_world_size_default_from_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    s = GroupedBatchSampler(ratios(), 2)
    assert (s.rank, s.world_size) == (2, 4)
    inf = InferenceSampler(10)
    assert (inf.rank, inf.world_size) == (2, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        GroupedBatchSampler(ratios(), 2, rank=4)


@pytest.mark.parametrize(("n", "m"), [(0, 10), (7, 13), (25, 40)])
def test_resume_continues_exactly(n: int, m: int) -> None:
    straight = take(GroupedBatchSampler(ratios(), 4, seed=3, rank=1, world_size=2), n + m)
    first = GroupedBatchSampler(ratios(), 4, seed=3, rank=1, world_size=2)
    head = take(first, n)
    state = json.loads(json.dumps(first.state_dict()))  # plain ints and lists: JSON round trip
    assert state["batches"] == n and state["seed"] == 3
    resumed = GroupedBatchSampler(ratios(), 4, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert head + take(resumed, m) == straight


def test_state_for_consumed_batches_while_prefetching() -> None:
    straight = take(GroupedBatchSampler(ratios(), 3, seed=0), 50)
    s = GroupedBatchSampler(ratios(), 3, seed=0)
    it = iter(s)
    for _ in range(30):  # a DataLoader ran ahead to batch 30 ...
        next(it)
    state = s.state_dict(consumed_batches=21)  # ... but the loop consumed 21
    assert state["batches"] == 21
    resumed = GroupedBatchSampler(ratios(), 3, seed=0)
    resumed.load_state_dict(state)
    assert take(resumed, 29) == straight[21:]
    # a second resume from the resumed sampler, asking for a state it never yielded (replayed)
    state2 = resumed.state_dict(consumed_batches=45)
    again = GroupedBatchSampler(ratios(), 3, seed=0)
    again.load_state_dict(state2)
    assert take(again, 5) == straight[45:]
    with pytest.raises(ValueError, match="before the state"):
        resumed.state_dict(consumed_batches=3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [(dict(seed=1), "seed"), (dict(batch_size=5), "batch_size"), (dict(world_size=3, rank=0), "world_size")],
)
def test_load_state_with_other_parameters(kwargs: dict, field: str, caplog: pytest.LogCaptureFixture) -> None:
    s = GroupedBatchSampler(ratios(), 4, seed=0, rank=0, world_size=2)
    take(s, 3)
    state = s.state_dict()
    args = {"seed": 0, "batch_size": 4, "rank": 0, "world_size": 2, **kwargs}

    def make() -> GroupedBatchSampler:
        return GroupedBatchSampler(ratios(), args["batch_size"], seed=args["seed"], rank=args["rank"],
                                   world_size=args["world_size"])

    with pytest.raises(ValueError, match=field):
        make().load_state_dict(state, strict=True)
    # default: a warning, then an approximate continuation in the same epoch, batch count kept
    other = make()
    with caplog.at_level("WARNING", logger="resnet_det.data.samplers"):
        other.load_state_dict(state)
    assert field in caplog.records[-1].getMessage() and "cannot continue" in caplog.records[-1].getMessage()
    resumed = other.state_dict()
    assert resumed["batches"] == 3 and resumed["epoch"] == state["epoch"]
    assert resumed["buckets"] == [[], []]
    assert len(take(other, 2)) == 2


def test_load_state_of_another_dataset_raises() -> None:
    s = GroupedBatchSampler(ratios(53), 4, seed=0)
    take(s, 3)
    with pytest.raises(ValueError, match="num_items"):
        GroupedBatchSampler(ratios(54), 4, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="malformed"):
        GroupedBatchSampler(ratios(53), 4, seed=0).load_state_dict({"epoch": 1})


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="empty"):
        GroupedBatchSampler([], 2)
    with pytest.raises(ValueError, match="batch_size"):
        GroupedBatchSampler(ratios(), 0)


@pytest.mark.parametrize(("size", "world"), [(10, 3), (16, 4), (2, 3), (0, 2), (7, 1)])
def test_inference_sampler_shards_without_padding(size: int, world: int) -> None:
    shards = [list(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)]
    assert flat(shards) == list(range(size))  # contiguous, ordered, no duplicates, no padding
    lengths = [len(InferenceSampler(size, rank=r, world_size=world)) for r in range(world)]
    assert lengths == [len(s) for s in shards] and max(lengths) - min(lengths) <= 1
