"""Matching exported detections to the eager model's: labels equal, boxes within 0.01 px, scores within 1e-4;
detections whose scores are near-tied may come out in either order, so they are paired by IoU, not position."""

from __future__ import annotations

import numpy as np

BOX_TOL = 0.01  # pixels
SCORE_TOL = 1e-4


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def match_detections(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], *, box_tol: float = BOX_TOL,
                     score_tol: float = SCORE_TOL) -> list[str]:
    """Problems (empty: equal) between two images' detections `{"boxes" (D, 4), "scores" (D,), "labels" (D,)}`.

    Each reference detection, by decreasing score, takes the unused exported detection of the same label with
    the highest IoU among those whose score is within `score_tol`; it must then be within `box_tol` per
    coordinate (and the mask, if any, within 1e-3 mean absolute probability). The counts must be equal.
    """
    problems = []
    n_ref, n_got = len(ref["scores"]), len(got["scores"])
    if n_ref != n_got:
        problems.append(f"{n_ref} eager detections, {n_got} exported")
    used = np.zeros(n_got, dtype=bool)
    iou = _iou(ref["boxes"], got["boxes"]) if n_ref and n_got else np.zeros((n_ref, n_got))
    for i in np.argsort(-ref["scores"], kind="stable"):
        ok = (~used) & (got["labels"] == ref["labels"][i]) & (np.abs(got["scores"] - ref["scores"][i]) <= score_tol)
        if not ok.any():
            problems.append(f"eager detection {i} (label {ref['labels'][i]}, score {ref['scores'][i]:.6f}, box "
                            f"{np.round(ref['boxes'][i], 3).tolist()}) has no exported match")
            continue
        j = int(np.argmax(np.where(ok, iou[i], -1.0)))
        used[j] = True
        err = float(np.abs(got["boxes"][j] - ref["boxes"][i]).max())
        if err > box_tol:
            problems.append(f"eager detection {i}: box differs by {err:.4f} px from its match {j}")
        if "masks" in ref and "masks" in got:
            merr = float(np.abs(got["masks"][j] - ref["masks"][i]).mean())
            if merr > 1e-3:
                problems.append(f"eager detection {i}: mask differs by {merr:.2e} (mean abs) from its match {j}")
    return problems
