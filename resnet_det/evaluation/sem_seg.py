"""Semantic segmentation evaluation: confusion matrix, mIoU, pixel accuracy, mean class accuracy.

The confusion matrix ``C`` has ground truth in rows and prediction in columns: ``C[g, p]`` counts
the pixels of ground-truth class ``g`` predicted as ``p``; pixels whose target is ``ignore_index``
are left out. From it, per class ``c`` (``TP = C[c, c]``, ``GT = C[c, :].sum()``,
``PRED = C[:, c].sum()``):

* ``IoU_c = TP / (GT + PRED - TP)``, NaN when the class is absent from both the ground truth and the
  prediction (``GT + PRED == 0``): such classes are undefined, not 0 and not 1, and are excluded
  from ``mIoU`` (the mean of the non-NaN values). A class predicted but absent from the ground truth
  has IoU 0 and counts.
* ``Acc_c = TP / GT`` (recall of the class), NaN when ``GT == 0``, excluded from ``mAcc``.
* ``pAcc = trace(C) / C.sum()`` (pixel accuracy over non-ignored pixels).
* ``fwIoU = sum_c (GT_c / C.sum()) * IoU_c`` over classes with a defined IoU.

This is detectron2's ``SemSegEvaluator`` arithmetic. Metrics are **fractions** in [0, 1].

:class:`SemSegEvaluator` follows the :class:`~resnet_det.evaluation.DatasetEvaluator` protocol: it
reads ``inputs[i]["sem_seg"]`` (the ground truth of the dataset's targets) and
``outputs[i]["sem_seg"]`` (the model's prediction) and reports ``{"sem_seg": {...}}``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from resnet_det_common import get_world_size, is_main_process, log_report, writing

from .evaluator import DatasetEvaluator

__all__ = ["CONFUSION_MATRIX_FILENAME", "SEM_SEG_METRICS_FILENAME", "SemSegEvaluator"]

CONFUSION_MATRIX_FILENAME = "confusion_matrix.png"
SEM_SEG_METRICS_FILENAME = "sem_seg_metrics.json"

_log = logging.getLogger(__name__)


def _sem_seg_map(item: Any, what: str) -> torch.Tensor:
    """``item["sem_seg"]`` as an ``[H, W]`` tensor, or a ``ValueError`` that says what is wrong."""
    if not isinstance(item, Mapping) or "sem_seg" not in item:
        keys = sorted(item) if isinstance(item, Mapping) else type(item).__name__
        source = ("the dataset must provide semantic targets (with_semantic=True)" if what.startswith("input")
                  else "the model must return a semantic prediction per image")
        raise ValueError(f"{what} has no 'sem_seg' (got {keys}); {source}")
    value = item["sem_seg"]
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if t.dim() != 2:
        hint = " (logits? pass logits.argmax(0))" if t.dim() == 3 else ""
        raise ValueError(f"{what}['sem_seg'] must be an [H, W] label map, got shape {list(t.shape)}{hint}")
    return t


class SemSegEvaluator(DatasetEvaluator):
    """Accumulates a confusion matrix over batches and computes mIoU / pAcc / mAcc.

    Usage::

        evaluator = SemSegEvaluator(num_classes=19, class_names=names, output_dir="out/eval")
        evaluator.reset()
        for images, targets in loader:
            evaluator.process(targets, model(images))   # targets[i]["sem_seg"], outputs[i]["sem_seg"]
        metrics = evaluator.evaluate()   # {"sem_seg": {"mIoU": 0.71, "pAcc": ..., "IoU-road": ..., ...}}

    Distributed: when ``torch.distributed`` is initialised, ``evaluate()`` sums the confusion
    matrices of all ranks with ``all_reduce`` (**every rank must call it**); rank 0 then logs the
    table, writes the files and returns the metrics, the other ranks return ``{}``. An all-reduce
    cannot tell repeated images apart: use a sampler that does not pad (a padding
    ``DistributedSampler`` counts the repeated images twice).

    Attributes:
        num_classes: Number of classes ``K``; labels are ``0..K-1``.
        ignore_index: Target value that is left out of every metric.
        class_names: One name per class.
        output_dir: Where ``confusion_matrix.png`` and ``sem_seg_metrics.json`` go (or ``None``).
        confusion_matrix: ``int64 [K, K]`` on CPU, ground truth in rows, prediction in columns
            (this rank's pixels only; ``evaluate()`` does not modify it).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        output_dir: str | Path | None = None,
    ) -> None:
        """Creates the evaluator.

        Args:
            num_classes: Number of classes (labels ``0..num_classes-1``).
            ignore_index: Target value to ignore (must lie outside ``[0, num_classes)``).
            class_names: One name per class; default ``"0"``, ``"1"``, ...
            output_dir: If set, ``evaluate()`` writes the confusion-matrix PNG and the metrics JSON.

        Raises:
            ValueError: ``num_classes < 1``, ``ignore_index`` is a class label, or the number of
                names differs from ``num_classes``.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index {ignore_index} is a class label (num_classes={num_classes}); use a value "
                "outside [0, num_classes), e.g. 255"
            )
        if class_names is None:
            class_names = [str(i) for i in range(num_classes)]
        class_names = [str(n) for n in class_names]
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.reset()

    def reset(self) -> None:
        """Clears the confusion matrix."""
        self.confusion_matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Adds a batch to the confusion matrix.

        Args:
            inputs: The batch's targets: ``inputs[i]["sem_seg"]`` is the ground-truth ``[H, W]``
                integer map of image ``i``; ``ignore_index`` pixels are skipped.
            outputs: The model's outputs: ``outputs[i]["sem_seg"]`` is the predicted ``[H, W]``
                integer map (labels, not logits) at the same size.

        Raises:
            ValueError: Different numbers of inputs and outputs, a missing ``sem_seg``, a shape
                mismatch (naming the index and both shapes), a non-integer map, or a label outside
                ``[0, num_classes)`` (other than ``ignore_index`` in a target). Nothing of a batch
                that fails is counted.
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"process() got {len(inputs)} inputs (targets) but {len(outputs)} outputs")
        k = self.num_classes
        batch = torch.zeros(k * k, dtype=torch.int64)
        for i, (inp, out) in enumerate(zip(inputs, outputs)):
            t = _sem_seg_map(inp, f"inputs[{i}]")
            p = _sem_seg_map(out, f"outputs[{i}]")
            if p.shape != t.shape:
                raise ValueError(
                    f"prediction {i} has shape {list(p.shape)} but its target has shape {list(t.shape)}; "
                    "resize the prediction (logits) to the target size before argmax"
                )
            for name, x in (("prediction", p), ("target", t)):
                if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                    raise ValueError(f"{name} {i} has dtype {x.dtype}; pass integer class labels")
            t = t.to(p.device).long()
            p = p.long()
            valid = t != self.ignore_index
            bad_t = valid & ((t < 0) | (t >= k))
            if bad_t.any():
                vals = torch.unique(t[bad_t])[:5].tolist()
                raise ValueError(
                    f"target {i} has labels {vals} outside [0, {k}) that are not ignore_index "
                    f"({self.ignore_index}); check num_classes and the label mapping"
                )
            p = p[valid]
            bad_p = (p < 0) | (p >= k)
            if bad_p.any():
                vals = torch.unique(p[bad_p])[:5].tolist()
                raise ValueError(f"prediction {i} has labels {vals} outside [0, {k})")
            batch += torch.bincount(t[valid] * k + p, minlength=k * k).cpu()
        self.confusion_matrix += batch.reshape(k, k)

    def _reduced_matrix(self) -> torch.Tensor:
        if get_world_size() == 1:
            return self.confusion_matrix.clone()
        device = torch.device("cpu")
        if "nccl" in str(dist.get_backend()).lower():
            device = torch.device("cuda", torch.cuda.current_device())
        matrix = self.confusion_matrix.to(device, copy=True)  # never reduce into our own matrix
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
        return matrix.cpu()

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Computes the metrics (every rank must call it; see the class docstring).

        Returns:
            ``{"sem_seg": {"mIoU", "fwIoU", "mAcc", "pAcc", "IoU-<name>"..., "Acc-<name>"...}}`` as
            fractions, on rank 0 (``{}`` on the other ranks); per-class values are NaN for
            undefined classes (see the module docstring). Everything is NaN, with a warning, when
            no pixel was counted.
        """
        matrix = self._reduced_matrix().double().numpy()
        if not is_main_process():
            return {}
        metrics = self.compute_metrics(matrix, self.class_names)
        if not matrix.sum():
            warnings.warn("SemSegEvaluator: no (non-ignored) pixel was processed; all metrics are NaN",
                          UserWarning, stacklevel=2)
        log_report(_log, self.format_table(metrics))
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.plot_confusion_matrix(
                matrix, self.class_names, self.output_dir / CONFUSION_MATRIX_FILENAME
            )
            report: dict[str, Any] = {
                "units": "fraction",
                "metrics": {k: (None if math.isnan(v) else v) for k, v in metrics.items()},
                "confusion_matrix": matrix.astype(np.int64).tolist(),
                "class_names": self.class_names,
                "ignore_index": self.ignore_index,
            }
            with writing(self.output_dir / SEM_SEG_METRICS_FILENAME, "evaluation file"):
                (self.output_dir / SEM_SEG_METRICS_FILENAME).write_text(json.dumps(report, indent=1))
        return {"sem_seg": metrics}

    @staticmethod
    def compute_metrics(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
        """Metrics from a confusion matrix (ground truth rows, prediction columns).

        Args:
            matrix: ``[K, K]`` counts.
            class_names: ``K`` names for the per-class keys.

        Returns:
            The metrics dict described in :meth:`evaluate`.
        """
        m = np.asarray(matrix, dtype=np.float64)
        tp = np.diag(m)
        gt = m.sum(axis=1)
        pred = m.sum(axis=0)
        union = gt + pred - tp
        total = m.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
        iou_valid = ~np.isnan(iou)
        acc_valid = ~np.isnan(acc)
        nan = float("nan")
        out = {
            "mIoU": float(iou[iou_valid].mean()) if iou_valid.any() else nan,
            "fwIoU": float((gt[iou_valid] / total * iou[iou_valid]).sum()) if total > 0 else nan,
            "mAcc": float(acc[acc_valid].mean()) if acc_valid.any() else nan,
            "pAcc": float(tp.sum() / total) if total > 0 else nan,
        }
        out.update({f"IoU-{n}": float(v) for n, v in zip(class_names, iou)})
        out.update({f"Acc-{n}": float(v) for n, v in zip(class_names, acc)})
        return out

    def format_table(self, metrics: dict[str, float]) -> str:
        """A readable text table: the means, then IoU / accuracy per class (NaN shown as ``nan``)."""

        def fmt(v: float) -> str:
            return "nan" if math.isnan(v) else f"{v:.4f}"

        lines = [
            "Semantic segmentation: "
            + "  ".join(f"{k}={fmt(metrics[k])}" for k in ("mIoU", "fwIoU", "mAcc", "pAcc"))
        ]
        w = max(len("class"), *(len(n) for n in self.class_names))
        lines.append(f"| {'class':<{w}} | IoU    | Acc    |")
        lines.append(f"|:{'-' * (w + 1)}|:-------|:-------|")
        for n in self.class_names:
            lines.append(f"| {n:<{w}} | {fmt(metrics[f'IoU-{n}']):<6} | {fmt(metrics[f'Acc-{n}']):<6} |")
        return "\n".join(lines)

    @staticmethod
    def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str | Path) -> Path:
        """Writes the row-normalised confusion matrix (each row: where that class's pixels went).

        Args:
            matrix: ``[K, K]`` counts, ground truth rows, prediction columns.
            class_names: ``K`` tick labels (shown when ``K <= 60``; cell values when ``K <= 25``).
            path: The PNG to write.

        Returns:
            ``path``.
        """
        from matplotlib.figure import Figure  # lazy; no pyplot, so no global backend state

        m = np.asarray(matrix, dtype=np.float64)
        k = m.shape[0]
        rows = m.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = np.where(rows > 0, m / rows, 0.0)
        size = min(max(5.0, 0.35 * k + 2.5), 30.0)
        fig = Figure(figsize=(size + 1.2, size), dpi=100)
        ax = fig.subplots()
        im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the ground-truth row")
        if k <= 60:
            ax.set_xticks(range(k))
            ax.set_yticks(range(k))
            ax.set_xticklabels(class_names, rotation=90, fontsize=8)
            ax.set_yticklabels(class_names, fontsize=8)
        if k <= 25:
            for g in range(k):
                for p in range(k):
                    if norm[g, p] >= 0.005:
                        ax.text(p, g, f"{norm[g, p]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if norm[g, p] > 0.5 else "black")
        ax.set_xlabel("Predicted class")
        ax.set_ylabel("Ground-truth class")
        ax.set_title(f"Confusion matrix (row-normalised), {int(m.sum())} pixels")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with writing(path, "evaluation plot"):
            fig.savefig(path)
        return path
