"""The one autocast helper: ``train.amp`` / ``--amp`` values ("bf16", "fp16", "off") to a context.

Box decoding, losses and anything with ``exp`` stay in float32 inside the models (a local
``torch.autocast(..., enabled=False)`` there is the one exception to "autocast is set up here").
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch

__all__ = ["AMP_DTYPES", "autocast", "check_autocast"]

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def _dtype(amp: str) -> torch.dtype | None:
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp={amp!r} is not a precision; use one of {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[amp]


def autocast(device: torch.device | str, amp: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to bf16 / fp16 on ``device``, or a no-op context for ``amp="off"``.

    Example::

        with autocast(device, "bf16"):
            losses = model(images, targets)
    """
    dtype = _dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def check_autocast(device: torch.device | str, amp: str) -> None:
    """Fails early and clearly when this torch/device cannot autocast to ``amp``'s dtype.

    torch warns and silently disables autocast for an unsupported dtype; this probe turns that into
    a ``ValueError`` that says which setting to use instead.
    """
    dtype = _dtype(amp)
    if dtype is None:
        return
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"amp={amp}: this GPU ({torch.cuda.get_device_name(device)}) does not support bfloat16; "
            "use fp16 or off"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = torch.ones(2, 2, device=device)
            with torch.autocast(device_type=device.type, dtype=dtype):
                out = torch.mm(a, a)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"amp={amp} is not supported on {device.type} with torch {torch.__version__}: {err}. Use bf16 or off."
        ) from err
    if out.dtype != dtype:
        raise ValueError(
            f"amp={amp}: torch {torch.__version__} does not autocast to {dtype} on {device.type}. "
            "Use bf16 (CPU and recent GPUs) or off."
        )
