"""Matching exported detections to the eager model's: labels equal, boxes within 0.01 px, scores within 1e-4;
detections whose scores are near-tied may come out in either order, so they are paired by IoU, not position."""

from __future__ import annotations

import numpy as np

BOX_TOL = 0.01  # pixels
# Scores: 1e-4 for all but one of the ~3000 detections the tests compare; the exception, measured 1.09e-4, is a
# 2-px-tall box of Faster R-CNN R50-FPN (random weights, 000000483108.jpg, 2026-12-02; its box agrees to 0.001 px),
# whose RoIAlign samples fall on pixel edges, so 2e-4 is allowed.
SCORE_TOL = 2e-4
# Mean absolute difference of a pasted mask's probabilities. Pasting truncates each (grown) box to integer pixels
# (torchvision's rule), so a coordinate within the box tolerance of an integer moves the mask by one pixel:
# measured 1.28e-3 on Mask R-CNN R50-FPN (random weights, tiny-COCO, 2026-12-02); boxes are checked to 0.01 px.
MASK_TOL = 5e-3


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def match_detections(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], *, box_tol: float = BOX_TOL,
                     score_tol: float = SCORE_TOL, cap: int | None = None, nms_thresh: float | None = None,
                     mask_tol: float = MASK_TOL) -> tuple[list[str], int]:
    """`(problems, near_ties)` between two images' detections `{"boxes" (D, 4), "scores" (D,), "labels" (D,)}`
    (problems empty: equal).

    Each reference detection, by decreasing score, takes the unused exported detection of the same label with
    the highest IoU among those whose score is within `score_tol`; it must then be within `box_tol` per
    coordinate (and the mask, if any, within `mask_tol` mean absolute probability). Every detection of either
    side must be matched, except near-ties, which are counted:

    - at the top-`cap` cut (both sides hold `cap` = `detections_per_img` detections): a detection scored within
      `score_tol` of the last one may be exchanged for another such one;
    - an NMS decision: a detection whose IoU with a detection of the same label on the other side lies within
      0.01 of `nms_thresh` (two runtimes' rounding decides whether it suppresses; thin boxes are the usual case).
    """
    problems = []
    n_ref, n_got = len(ref["scores"]), len(got["scores"])
    at_cap = cap is not None and n_ref == n_got == cap
    cut = float(min(ref["scores"].min(), got["scores"].min())) + score_tol if at_cap and cap else -np.inf
    used = np.zeros(n_got, dtype=bool)
    iou = _iou(ref["boxes"], got["boxes"]) if n_ref and n_got else np.zeros((n_ref, n_got))
    same = ref["labels"][:, None] == got["labels"][None, :]

    def nms_tie(row: np.ndarray, labels: np.ndarray) -> bool:
        return nms_thresh is not None and bool((labels & (np.abs(row - nms_thresh) <= 0.01)).any())

    near_ties = 0
    for i in np.argsort(-ref["scores"], kind="stable"):
        ok = (~used) & same[i] & (np.abs(got["scores"] - ref["scores"][i]) <= score_tol)
        if not ok.any():
            if ref["scores"][i] <= cut or nms_tie(iou[i], same[i]):
                near_ties += 1
                continue
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
            if merr > mask_tol:
                problems.append(f"eager detection {i}: mask differs by {merr:.2e} (mean abs) from its match {j}")
    for j in np.flatnonzero(~used):
        if got["scores"][j] <= cut or nms_tie(iou[:, j], same[:, j]):
            near_ties += 1
        else:
            problems.append(f"exported detection {j} (label {got['labels'][j]}, score {got['scores'][j]:.6f}, box "
                            f"{np.round(got['boxes'][j], 3).tolist()}) has no eager match")
    return problems, near_ties


def spread_classifier(model, image, seed: int = 0, logit_std: float = 2.0, objectness_std: float = 2.0) -> None:
    """Give a randomly initialised detector's RPN objectness and box predictor seeded weights under which its
    proposals and detections have well-spread scores and varied classes (as a trained model's), so parity has
    real detections to compare rather than near-ties.

    A random RPN head (std 0.01) scores every anchor about alike, so the proposals are decided by differences of
    1e-6 (any two runtimes' rounding): its objectness is scaled to logits of std `objectness_std`. Random box-head
    features share one large common component, which makes a random classifier score every RoI alike; rows
    orthogonal to the mean feature (measured on `image`, float `[3, H, W]`) remove it.
    """
    import torch

    feats = {}
    hooks = [model.roi_heads.box_head.register_forward_hook(lambda m, i, o: feats.__setitem__("x", o)),
             model.rpn.head.register_forward_hook(lambda m, i, o: feats.__setitem__("obj", o[0]))]
    with torch.no_grad():
        model([image])
        obj = model.rpn.head.objectness
        obj.weight.mul_(objectness_std / feats["obj"].std().clamp(min=1e-12))
        obj.bias.zero_()
        model([image])  # the box head's features on the new proposals
    for h in hooks:
        h.remove()
    x = feats["x"]
    mu = x.mean(0)
    g = torch.Generator().manual_seed(seed)
    pred = model.roi_heads.predictor
    w = torch.randn(pred.cls_score.weight.shape, generator=g)
    w -= (w @ mu)[:, None] * mu[None] / (mu @ mu).clamp(min=1e-12)
    spread = (x @ w.T).std().clamp(min=1e-12)
    with torch.no_grad():
        pred.cls_score.weight.copy_(w * (logit_std / spread))
        pred.cls_score.bias.zero_()
        pred.bbox_pred.weight.copy_(torch.randn(pred.bbox_pred.weight.shape, generator=g) * 0.001)
        pred.bbox_pred.bias.zero_()
