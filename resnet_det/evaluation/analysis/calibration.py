"""Confidence calibration of detections: D-ECE (Küppers et al., "Multivariate Confidence Calibration
for Object Detection", CVPR Workshops 2020), confidence-only variant.

A detection is *correct* when it is a true positive of COCO's matching at IoU 0.5 (area all, the 100
best per image and category; crowd-ignored detections are left out). The scores are split into
``B`` equal-width bins over [0, 1] (a score of 1 goes to the last bin); in bin ``b`` with ``n_b``
detections, ``prec(b)`` is the fraction that is correct and ``conf(b)`` the mean score, and

    D-ECE = sum_b n_b / N * |prec(b) - conf(b)|

(0 for a perfectly calibrated detector, up to 1). This is the expected calibration error of
classification with precision in place of accuracy, as the paper defines it for detection; its
multivariate variants (binning also over box position and size) are not computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Calibration", "detection_ece"]


@dataclass
class Calibration:
    """D-ECE and its bins.

    Attributes:
        d_ece: The D-ECE (fraction).
        bin_edges: ``[B + 1]`` bin edges.
        count: ``[B]`` detections per bin.
        confidence: ``[B]`` mean score per bin (NaN for an empty bin).
        precision: ``[B]`` fraction correct per bin (NaN for an empty bin).
        num_detections: ``N``.
    """

    d_ece: float
    bin_edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    precision: np.ndarray
    num_detections: int


def detection_ece(scores: np.ndarray, correct: np.ndarray, *, bins: int = 10) -> Calibration:
    """D-ECE of detections with confidences ``scores`` and correctness ``correct``.

    Args:
        scores: ``[N]`` confidences in [0, 1].
        correct: ``[N]`` bool, true positives at IoU 0.5.
        bins: Number of equal-width confidence bins.

    Returns:
        The :class:`Calibration` (D-ECE NaN when ``N == 0``).

    Raises:
        ValueError: ``bins < 1``, shapes differ, or a score is outside [0, 1] (scores that are not
            probabilities, e.g. logits, have no calibration).
    """
    if not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if scores.shape != correct.shape:
        raise ValueError(f"scores {scores.shape} and correct {correct.shape} must have the same length")
    if scores.size and (scores.min() < 0 or scores.max() > 1):
        raise ValueError(
            f"scores range over [{scores.min():.4g}, {scores.max():.4g}]; calibration needs confidences in "
            "[0, 1] (probabilities, not logits)"
        )
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.minimum((scores * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=scores, minlength=bins)
    hit_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.where(count > 0, conf_sum / count, np.nan)
        prec = np.where(count > 0, hit_sum / count, np.nan)
    n = int(scores.size)
    d_ece = float(np.nansum(count / n * np.abs(prec - conf))) if n else float("nan")
    return Calibration(d_ece=d_ece, bin_edges=edges, count=count, confidence=conf, precision=prec,
                       num_detections=n)
