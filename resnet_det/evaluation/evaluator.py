"""One evaluator protocol, and the loop that feeds evaluators without knowing any of them.

Every evaluator (:class:`~resnet_det.evaluation.COCOEvaluator`,
:class:`~resnet_det.evaluation.SemSegEvaluator`, yours) is a :class:`DatasetEvaluator`:

- ``reset()`` forgets what was processed;
- ``process(inputs, outputs)`` takes one batch: ``inputs`` are the batch's targets (dicts with
  ``image_id``, and ``sem_seg`` for semantic ground truth), ``outputs`` the model's per-image dicts
  (``boxes``/``scores``/``labels``/``masks``/``sem_seg``, on the CPU, float32);
- ``evaluate()`` returns the metrics as a dict of top-level keys (``{"bbox": {...}}``,
  ``{"sem_seg": {...}}``) on the main process and ``{}`` on the others. **Every process must call
  it**: evaluators gather or reduce what each process saw.

:class:`DatasetEvaluators` runs several as one and refuses two that report the same top-level key.
:func:`inference_on_dataset` is the loop: model in eval mode (restored after), autocast, outputs to
the CPU in float32, each batch to ``evaluator.process``, then ``evaluator.evaluate()``.
"""

from __future__ import annotations

import abc
import datetime
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from resnet_det_common import autocast, is_main_process, progress_bar

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset"]

_log = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 30.0
"""Without a progress bar (stderr not a terminal), a progress line is logged at most this often."""


class DatasetEvaluator(abc.ABC):
    """The evaluator protocol (see the module docstring)."""

    def reset(self) -> None:  # noqa: B027 (a stateless evaluator needs no reset)
        """Forgets everything processed so far; called before each evaluation."""

    @abc.abstractmethod
    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Takes one batch.

        Args:
            inputs: The batch's targets, one dict per image (``image_id``, ``sem_seg``, ...).
            outputs: The model's outputs, one dict per image, in the same order.
        """

    @abc.abstractmethod
    def evaluate(self) -> dict[str, Any]:
        """Computes the metrics of everything processed since ``reset()``.

        Every process must call it. Returns ``{top-level key: metrics}`` on the main process and
        ``{}`` on the others.
        """


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators as one: each gets every call, in the order given.

    Args:
        evaluators: The evaluators (an empty list evaluates nothing and returns ``{}``).

    Raises:
        TypeError: An item is not a :class:`DatasetEvaluator`.
    """

    def __init__(self, evaluators: Iterable[DatasetEvaluator]) -> None:
        self.evaluators = list(evaluators)
        for i, ev in enumerate(self.evaluators):
            if not isinstance(ev, DatasetEvaluator):
                raise TypeError(
                    f"DatasetEvaluators item {i} is a {type(ev).__name__}, not a DatasetEvaluator; "
                    "evaluators implement reset(), process(inputs, outputs) and evaluate()"
                )

    def reset(self) -> None:
        for ev in self.evaluators:
            ev.reset()

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        for ev in self.evaluators:
            ev.process(inputs, outputs)

    def evaluate(self) -> dict[str, Any]:
        """Every evaluator's ``evaluate()`` (all of them, on every process), merged.

        Raises:
            ValueError: Two evaluators report the same top-level key (one would hide the other).
        """
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for ev in self.evaluators:
            results = ev.evaluate()  # every process calls every evaluator: they may be collectives
            if not isinstance(results, Mapping):
                raise TypeError(f"{type(ev).__name__}.evaluate() returned a {type(results).__name__}, not a dict")
            for key, value in results.items():
                if key in merged:
                    raise ValueError(
                        f"{type(ev).__name__} and {owner[key]} both report {key!r}; give each evaluator "
                        "its own top-level keys (one would hide the other's metrics)"
                    )
                merged[key] = value
                owner[key] = type(ev).__name__
        return merged


def _to_cpu(output: Mapping[str, Any]) -> dict[str, Any]:
    """An output dict with its tensors on the CPU, floating point ones as float32."""
    return {
        k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu())
        if isinstance(v, Tensor) else v
        for k, v in output.items()
    }


#: Non-finite images named one warning each, up to this many; the rest are counted in one line at the end.
MAX_NONFINITE_WARNINGS = 20


def nonfinite_check(model: nn.Module) -> Any:
    """The model's ``nonfinite_images()`` (the detectors of this project have one), or None."""
    check = getattr(getattr(model, "module", model), "nonfinite_images", None)
    return check if callable(check) else None


def _image_name(loader: Any, target: Mapping[str, Any]) -> str:
    """``image 139 (000000000139.jpg)`` when the loader's dataset knows the file, else ``image 139``."""
    image_id = target.get("image_id") if isinstance(target, Mapping) else None
    dataset = getattr(loader, "dataset", None)
    ids, info = getattr(dataset, "ids", None), getattr(dataset, "image_info", None)
    if image_id is not None and ids is not None and callable(info):
        try:
            return f"image {image_id} ({info(list(ids).index(image_id))['file_name']})"
        except (ValueError, KeyError, IndexError, TypeError):
            pass
    return f"image {image_id}"


def warn_nonfinite(name: str, count: int) -> None:
    """The one warning for an image whose outputs were non-finite (``count``: images so far, this one included)."""
    if count <= MAX_NONFINITE_WARNINGS:
        _log.warning("%s: the model produced non-finite values (NaN/inf) for it; it gets no detections. The "
                     "weights are NaN or the activations overflow: check the checkpoint (and, for a model trained "
                     "from scratch, the normalisation: model.backbone.norm=GN/BN/SyncBN rather than FrozenBN)", name)
    elif count == MAX_NONFINITE_WARNINGS + 1:
        _log.warning("more images with non-finite outputs: not named one by one (the total is logged at the end)")


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


@torch.no_grad()
def inference_on_dataset(
    model: nn.Module,
    loader: Iterable[tuple[Any, Sequence[Mapping[str, Any]]]],
    evaluator: DatasetEvaluator,
    *,
    device: torch.device | str,
    amp: str = "off",
    progress: bool = True,
) -> dict[str, Any]:
    """Runs ``model`` over ``loader`` and evaluates its outputs with ``evaluator``.

    Every process must call it (with its own shard of the data): ``evaluator.evaluate()`` gathers.
    The model is put in eval mode and given back in the mode it had; the evaluator is reset first.

    Args:
        model: A detector in torchvision's convention: ``model(images)`` returns one dict per image.
        loader: Yields ``(images, targets)``: ``images`` a list of ``[3, H, W]`` tensors (or one
            batched tensor), ``targets`` one dict per image (passed to ``process`` as ``inputs``).
        evaluator: What to compute (a :class:`DatasetEvaluators` for several).
        device: The model's device; images are moved there.
        amp: ``"bf16"``, ``"fp16"`` or ``"off"`` (autocast of the forward pass).
        progress: Show a progress bar (main process, stderr a terminal) or, without a terminal,
            log a progress line every :data:`LOG_EVERY_SECONDS`.

    Returns:
        ``evaluator.evaluate()`` on the main process, ``{}`` on the others.

    Raises:
        ValueError: A batch is not an ``(images, targets)`` pair, or the model returned a number
            of outputs other than the number of images.
    """
    device = torch.device(device)
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    main = is_main_process()
    evaluator.reset()
    was_training = model.training
    model.eval()
    start = last_log = time.perf_counter()
    n_images = 0
    check_nonfinite = nonfinite_check(model)
    n_nonfinite = 0
    try:
        with progress_bar(total=total, desc="eval", unit="batch", enabled=progress and main, leave=False) as bar:
            for index, batch in enumerate(loader):
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise ValueError(f"the evaluation loader must yield (images, targets) pairs, got "
                                     f"{type(batch).__name__} at batch {index}")
                images, targets = batch
                if isinstance(images, Tensor):
                    images = images.to(device, non_blocking=True)
                else:
                    images = [img.to(device, non_blocking=True) for img in images]
                with autocast(device, amp):
                    outputs = model(images)
                if len(outputs) != len(images):
                    raise ValueError(f"the model returned {len(outputs)} outputs for {len(images)} images "
                                     f"(batch {index}); it must return one dict per image in eval mode")
                for i in check_nonfinite() if check_nonfinite is not None else ():
                    n_nonfinite += 1
                    warn_nonfinite(_image_name(loader, targets[i]), n_nonfinite)
                evaluator.process(targets, [_to_cpu(o) for o in outputs])
                n_images += len(images)
                if bar is not None:
                    bar.update(1)
                elif progress and main and time.perf_counter() - last_log > LOG_EVERY_SECONDS:
                    last_log = time.perf_counter()
                    per_batch = (last_log - start) / (index + 1)
                    eta = f", eta {_format_eta(per_batch * (total - index - 1))}" if total is not None else ""
                    _log.info("inference: batch %d%s, %.3f s/batch%s", index + 1,
                              f"/{total}" if total is not None else "", per_batch, eta)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if n_nonfinite:
        _log.warning("%d of %d images (this process) got no detections: the model produced non-finite values "
                     "(NaN/inf) for them", n_nonfinite, n_images)
    if main:
        _log.info("inference on %d images (this process) took %.1f s (%.4f s/image)", n_images, seconds,
                  seconds / max(1, n_images))
    results = evaluator.evaluate()
    return dict(results) if main else {}
