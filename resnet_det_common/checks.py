"""Argument checks shared by the typed specs (model layer) and the run configs (engine layer)."""

from __future__ import annotations

from typing import Any

__all__ = ["check"]


def check(cond: bool, key: str, value: Any, requirement: str) -> None:
    """Raises a ``ValueError`` naming the dotted key, the value and the rule when ``cond`` is false.

    Example::

        check(lr > 0, "solver.lr", lr, "must be > 0")
        # ValueError: config key 'solver.lr' = -1.0 is invalid: must be > 0
    """
    if not cond:
        raise ValueError(f"config key '{key}' = {value!r} is invalid: {requirement}")
