"""Seeding, and random-number-generator states as plain containers for checkpoints.

The states of Python's ``random``, NumPy's legacy global generator, torch's CPU generator and the
current CUDA device's generator are captured as lists, ints, floats, strings and tensors only, so
that ``torch.load(..., weights_only=True)`` reads them back (a pickled NumPy array would not load).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["get_rng_states", "preserve_rng_states", "seed_everything", "set_rng_states"]


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seeds Python, NumPy and torch (all devices) with ``seed + rank``.

    Each process gets its own seed so that random augmentations differ across GPUs, while a rerun
    with the same seed and world size repeats itself.

    Args:
        seed: The config's seed.
        rank: This process's global rank.

    Returns:
        The seed used.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    value = seed + rank
    random.seed(value)
    # NumPy's legacy seed must fit in 32 bits.
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    return value


def get_rng_states() -> dict[str, Any]:
    """This process's RNG states as plain containers (see the module docstring)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    """Restores states captured by :func:`get_rng_states` (missing entries are left alone)."""
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "numpy" in state:
        npst = state["numpy"]
        keys = np.asarray(torch.as_tensor(npst["keys"]).numpy(), dtype=np.uint32)
        np.random.set_state((npst["name"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"], dtype=torch.uint8))


@contextlib.contextmanager
def preserve_rng_states() -> Iterator[None]:
    """Runs a block (e.g. an evaluation) without changing any RNG state seen by the code after it.

    Training then follows the same random path whatever the evaluation period, and a run resumed
    from a checkpoint repeats the uninterrupted run exactly.
    """
    state = get_rng_states()
    try:
        yield
    finally:
        set_rng_states(state)
