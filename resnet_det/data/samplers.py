"""Samplers: infinite aspect-ratio-grouped training batches with exact resumption, and sharded
inference.

**Training stream.** Epoch ``e`` is a permutation of all dataset indices drawn with
``torch.Generator().manual_seed(seed + e)`` (the same on every rank). Rank ``r`` of ``world_size``
takes ``perm[r::world_size]``, so ranks see disjoint parts of each epoch and together cover it
(no padding, no duplicates; rank shards differ in length by at most one). Walking its shard, a
rank puts each index into the bucket of its group (aspect ratio ``w >= h`` -> group 0, ``w < h``
-> group 1, or a single group without grouping) and yields a bucket as a batch when it holds
``batch_size`` indices. Leftover indices stay in their bucket and are batched in the next epoch,
so the stream never ends and never drops an image.

**Resumption.** The whole stream is a deterministic function of the sampler state (seed, epoch,
position in the epoch's shard, bucket contents, batches yielded). ``state_dict()`` returns it as
plain ints / lists of ints; ``load_state_dict()`` makes the next iteration continue exactly there.

A ``DataLoader`` pulls batches from its batch sampler ahead of the training loop (prefetching
``num_workers * prefetch_factor`` batches), so the sampler's own position is *ahead* of what the
loop has consumed. Therefore ``state_dict(consumed_batches=n)`` returns the state *after exactly
``n`` batches* (``n`` counts from the beginning of training: the ``batches`` field of the states),
looked up in a short history of recent states or recomputed by replaying the stream from the
state the current iteration started from. :class:`resnet_det.data.build.TrainLoader` counts the
batches it hands to the training loop and does this for you: save ``loader.state_dict()`` with
the checkpoint.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from resnet_det_common import get_rank, get_world_size

logger = logging.getLogger(__name__)

__all__ = ["GroupedBatchSampler", "InferenceSampler", "default_rank_world_size"]

_HISTORY = 4096


def default_rank_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: given values, else ``torch.distributed``'s when initialised, else (0, 1).

    Raises:
        ValueError: ``rank`` is not in ``[0, world_size)``.
    """
    if world_size is None:
        world_size = get_world_size()
    if rank is None:
        rank = get_rank()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


class GroupedBatchSampler:
    """Infinite, seeded, rank-sharded batch sampler grouping images by aspect ratio.

    Yields lists of ``batch_size`` dataset indices (per process), forever.

    Args:
        aspect_ratios: Width / height of every dataset item (e.g. ``dataset.aspect_ratios()``).
        batch_size: Images per batch on this process.
        seed: Base seed; epoch ``e`` uses ``seed + e``. Must be identical on all ranks.
        group: Group by aspect ratio (``w >= h`` vs ``w < h``); ``False`` = one group.
        rank: This process' rank; default from ``torch.distributed`` if initialised, else 0.
        world_size: Number of processes; default from ``torch.distributed``, else 1.

    Raises:
        ValueError: Empty dataset, non-positive batch size, invalid rank/world size.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[float],
        batch_size: int,
        *,
        seed: int = 0,
        group: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if len(aspect_ratios) == 0:
            raise ValueError("GroupedBatchSampler: the dataset is empty")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"GroupedBatchSampler: batch_size must be a positive int, got {batch_size!r}")
        self.rank, self.world_size = default_rank_world_size(rank, world_size)
        if len(aspect_ratios) < self.world_size:
            raise ValueError(
                f"GroupedBatchSampler: {len(aspect_ratios)} images cannot be sharded over "
                f"{self.world_size} ranks (each rank needs at least one)"
            )
        self.num_items = len(aspect_ratios)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.group = group
        self.group_ids = [0 if (not group or float(a) >= 1.0) else 1 for a in aspect_ratios]
        self.num_groups = 2 if group else 1
        self._start = self._initial_state()
        self._history: deque[dict[str, Any]] = deque(maxlen=_HISTORY)
        self._shard_cache: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ state machine
    def _initial_state(self) -> dict[str, Any]:
        return {"epoch": 0, "position": 0, "batches": 0, "buckets": [[] for _ in range(self.num_groups)]}

    def _shard(self, epoch: int) -> list[int]:
        shard = self._shard_cache.get(epoch)
        if shard is None:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_items, generator=g).tolist()
            shard = perm[self.rank :: self.world_size]
            if len(self._shard_cache) >= 2:
                self._shard_cache.pop(min(self._shard_cache))
            self._shard_cache[epoch] = shard
        return shard

    def _step(self, state: dict[str, Any]) -> list[int]:
        """Advances ``state`` (in place) by one batch and returns the batch."""
        buckets = state["buckets"]
        while True:
            shard = self._shard(state["epoch"])
            if state["position"] >= len(shard):
                state["epoch"] += 1
                state["position"] = 0
                continue
            idx = shard[state["position"]]
            state["position"] += 1
            bucket = buckets[self.group_ids[idx]]
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                batch = list(bucket)
                bucket.clear()
                state["batches"] += 1
                return batch

    def __iter__(self) -> Iterator[list[int]]:
        """Yields batches from the start state (initial, or the last loaded one)."""
        state = copy.deepcopy(self._start)
        self._history.clear()
        self._history.append(copy.deepcopy(state))
        while True:
            batch = self._step(state)
            self._history.append(copy.deepcopy(state))
            yield batch

    # ------------------------------------------------------------------ resumption
    def _meta(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_items": self.num_items,
            "group": int(self.group),
        }

    def state_at(self, consumed_batches: int) -> dict[str, Any]:
        """The sampler state after exactly ``consumed_batches`` batches since training began.

        Raises:
            ValueError: ``consumed_batches`` is before the state this iteration started from.
        """
        start = self._start["batches"]
        if consumed_batches < start:
            raise ValueError(
                f"consumed_batches={consumed_batches} is before the state this sampler started from "
                f"(batch {start}); pass the total number of batches consumed since training began"
            )
        for st in reversed(self._history):
            if st["batches"] == consumed_batches:
                return copy.deepcopy(st)
        # Not in the recent history: replay from the nearest earlier state (deterministic).
        base = self._start
        for st in self._history:
            if st["batches"] <= consumed_batches and st["batches"] >= base["batches"]:
                base = st
        state = copy.deepcopy(base)
        while state["batches"] < consumed_batches:
            self._step(state)
        return state

    def state_dict(self, consumed_batches: int | None = None) -> dict[str, Any]:
        """Plain-int state to resume from.

        Args:
            consumed_batches: Batches the training loop has consumed since training began
                (including batches before a previous resume). ``None``: the batches this sampler
                has itself yielded, correct only when nothing prefetches (no DataLoader between
                the sampler and the loop).

        Returns:
            ``{"seed", "batch_size", "rank", "world_size", "num_items", "group", "epoch",
            "position", "batches", "buckets"}``; ``buckets`` is a list of lists of indices.
        """
        if consumed_batches is None:
            state = copy.deepcopy(self._history[-1] if self._history else self._start)
        else:
            state = self.state_at(int(consumed_batches))
        return {**self._meta(), **state}

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = False) -> None:
        """Makes the next iteration continue after ``state``.

        If ``state`` was saved with this sampler's seed, batch size, rank and world size, the
        continuation is exact. Otherwise (e.g. resuming on a different number of GPUs) it cannot
        be: with ``strict=False`` (default) a warning is logged and the stream goes on from the same
        epoch at the same fraction of it, with this sampler's parameters; the saved buckets
        (at most ``batch_size - 1`` indices per group, belonging to the old shard) are dropped and
        counted in the warning. The batch count (``batches``) is kept either way.

        Args:
            state: A dict from :meth:`state_dict`.
            strict: Raise instead of continuing approximately.

        Raises:
            ValueError: The state is malformed, was saved for a dataset of another size or another
                grouping, or (with ``strict``) with another seed, batch size, rank or world size.
        """
        try:
            epoch, position, batches = int(state["epoch"]), int(state["position"]), int(state["batches"])
            buckets = [[int(i) for i in b] for b in state["buckets"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"GroupedBatchSampler.load_state_dict: malformed state ({e!r})") from e
        meta = self._meta()
        mismatched = {k: (state.get(k), v) for k, v in meta.items() if state.get(k) != v}
        detail = ", ".join(f"{k}: saved {s!r}, now {v!r}" for k, (s, v) in mismatched.items())
        fatal = {"num_items", "group"} & set(mismatched)
        if fatal or (mismatched and strict) or len(buckets) != self.num_groups:
            raise ValueError(
                f"GroupedBatchSampler.load_state_dict: the saved state does not match this sampler "
                f"({detail or f'{len(buckets)} buckets, expected {self.num_groups}'}); resume with the same "
                "dataset" + (", seed, batch size and world size" if strict else "")
            )
        if mismatched:
            saved_len = len(range(int(state["rank"]), self.num_items, int(state["world_size"])))
            fraction = position / max(saved_len, 1)
            position = min(round(fraction * len(self._shard(epoch))), len(self._shard(epoch)))
            dropped = sum(len(b) for b in buckets)
            buckets = [[] for _ in range(self.num_groups)]
            logger.warning(
                "GroupedBatchSampler: the saved state differs (%s), so the data order cannot continue "
                "exactly; continuing epoch %d at %.1f%% of it, %d buffered indices dropped",
                detail, epoch, 100 * fraction, dropped,
            )
        self._start = {"epoch": epoch, "position": position, "batches": batches, "buckets": buckets}
        self._history.clear()


class InferenceSampler(torch.utils.data.Sampler[int]):
    """Splits ``range(size)`` into ``world_size`` contiguous shards, without padding or duplicates.

    Rank ``r`` gets ``[begin_r, end_r)``, shard sizes differ by at most one; concatenating the
    shards of all ranks in rank order gives ``0..size-1`` in order (as detectron2's sampler).

    Args:
        size: Dataset length.
        rank: Default from ``torch.distributed`` if initialised, else 0.
        world_size: Default from ``torch.distributed`` if initialised, else 1.
    """

    def __init__(self, size: int, *, rank: int | None = None, world_size: int | None = None) -> None:
        if size < 0:
            raise ValueError(f"InferenceSampler: size must be >= 0, got {size}")
        self.size = size
        self.rank, self.world_size = default_rank_world_size(rank, world_size)
        per, extra = divmod(size, self.world_size)
        self.begin = self.rank * per + min(self.rank, extra)
        self.end = self.begin + per + (1 if self.rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin
