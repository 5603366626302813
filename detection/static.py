"""Static-shape, synchronisation-free inference for FPN Faster R-CNN: every tensor between the padded batch
and the final `(B, detections_per_img)` boxes has a shape known before the call, so the whole predict path
can be captured once in a CUDA graph and replayed (one launch instead of hundreds, no host round trip).

The eager model synchronises where a size depends on the data: the proposal NMS, grouping RoIs by FPN level,
and the per-class NMS after the box head. Here each of those is replaced by an exact fixed-shape equivalent:

- **NMS**: greedy NMS is the unique solution of `keep[i] = valid[i] and no j before i (higher score) with
  keep[j] and IoU(i, j) > t`. Iterating that equation from "all kept" (Cluster-NMS, Zheng et al. 2021)
  reaches the solution in as many steps as the longest chain of suppressions; `cluster_nms` runs a fixed
  number of steps on the `(K, K)` IoU matrix and reports whether it converged (then the result *is* the
  greedy one, same IoU arithmetic and `>` test as torchvision's kernels).
- **RoI pooling**: every RoI is pooled from every level and the right level's result kept (`torch.where`);
  RoIAlign treats each RoI independently, so the values are those of per-level pooling.
- **Post-processing**: the per-class NMS runs on the `max_candidates` best class scores of each image. A
  candidate's fate only depends on higher-scoring ones, so it is exact whenever at least
  `detections_per_img` of those survive or all candidates fit; `ok` says so.

`StaticPredictor` checks `ok` (read together with the outputs: the one synchronisation of a call) and falls
back to the eager model for a batch where a fixed-size step was not exact, so its detections are always the
eager model's on the same padded batch (`Preprocessor.fixed_size`), which the tests prove on CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from resnet_det_common import autocast

from .boxes import clip_boxes, nonempty
from .faster_rcnn import FasterRCNN
from .preprocess import check_images

AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pairwise_iou_batched(boxes: Tensor) -> Tensor:
    """IoU of every pair of `(..., K, 4)` xyxy boxes -> `(..., K, K)`, fp32, with the arithmetic of
    torchvision's NMS kernels (`inter / (area_i + area_j - inter)`)."""
    b = boxes.float()
    area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(b[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(b[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[..., :, None] + area[..., None, :] - inter)


def cluster_nms(boxes: Tensor, valid: Tensor, iou_threshold: float, *, groups: Tensor | None = None,
                iterations: int | None = None) -> tuple[Tensor, Tensor]:
    """Greedy NMS on boxes already sorted by decreasing score, with fixed shapes.

    Args:
        boxes: `(..., K, 4)` xyxy, sorted by decreasing score along `K`.
        valid: `(..., K)` candidates (the others neither survive nor suppress).
        iou_threshold: a box is suppressed by an earlier kept box of IoU `> iou_threshold`.
        groups: optional `(..., K)` ids; boxes of different groups never suppress each other (per-class NMS).
        iterations: fixed number of steps (no host synchronisation: CUDA-graph safe); None iterates until
            the result stops changing (one synchronisation per step).

    Returns:
        `keep (..., K)` and a 0-dim bool tensor, True when the iteration converged, i.e. `keep` is exactly
        greedy NMS's result.
    """
    k = boxes.shape[-2]
    if k == 0:
        return valid.clone(), torch.ones((), dtype=torch.bool, device=boxes.device)
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).tril(-1)  # [i, j]: j comes before i
    suppresses = (pairwise_iou_batched(boxes) > iou_threshold) & earlier & valid[..., None, :]
    if groups is not None:
        suppresses &= groups[..., :, None] == groups[..., None, :]
    s = suppresses.to(torch.float16 if boxes.is_cuda else torch.float32)
    keep = valid
    converged = torch.zeros((), dtype=torch.bool, device=boxes.device)
    steps = iterations if iterations is not None else k + 1
    for _ in range(steps):
        # keep[i] = valid[i] and no kept j before i suppresses i (a matrix-vector product counts them)
        hit = (s @ keep.to(s.dtype)[..., None]).squeeze(-1) > 0
        new = valid & ~hit
        converged = torch.equal(new, keep) if iterations is None else (new == keep).all()
        keep = new
        if iterations is None and converged:
            break
    if iterations is None:
        converged = torch.tensor(bool(converged), device=boxes.device)
    return keep, converged


class StaticPredictor:
    """Fixed-shape, sync-free inference of an FPN `FasterRCNN`, captured in a CUDA graph on a GPU.

    `predictor(images)` returns what `model(images)` returns (one dict per image with `boxes`, `scores`,
    `labels`), for the model with `preprocessor.fixed_size = canvas` when `canvas` is given.

    Args:
        model: an FPN Faster R-CNN (usually after `prepare_for_inference()`); it is put in eval mode.
        canvas: `(H, W)` every batch is padded to (a multiple of the size divisibility), so one graph serves
            all batches of a batch size; None pads each batch as the eager model does (one graph per size).
        dtype: "fp32", or "bf16" / "fp16" autocast inside the predictor (the backbone and heads; boxes,
            scores and NMS stay fp32).
        cuda_graph: capture and replay a CUDA graph per (batch size, canvas) (default: on CUDA devices).
        compile_backbone: `torch.compile` the backbone + FPN first.
        nms_iterations: fixed steps of `cluster_nms` (the eager fallback covers the rare batch that needs
            more).
        fixed_iterations: run `nms_iterations` steps without synchronising (default: with a CUDA graph);
            False iterates until convergence, reading a flag back after each step.
        max_candidates: class scores per image that enter the final NMS (at least `detections_per_img`).
        pooling: "all-levels" (every RoI from every level: no sync; default on GPUs) or "grouped" (the
            model's pooler, which reads the level counts back once; default on CPUs, where pooling is costly).

    Example::

        model = fasterrcnn_resnet50_fpn(weights="COCO_V1").cuda().prepare_for_inference()
        predict = StaticPredictor(model, canvas=(800, 1344))
        detections = predict([image])          # same detections as model(...) with that canvas
    """

    def __init__(self, model: FasterRCNN, *, canvas: tuple[int, int] | None = None, dtype: str = "fp32",
                 cuda_graph: bool | None = None, compile_backbone: bool = False, nms_iterations: int = 16,
                 fixed_iterations: bool | None = None, max_candidates: int = 1000,
                 pooling: str | None = None) -> None:
        if not isinstance(model, FasterRCNN):
            raise TypeError(f"StaticPredictor needs a detection.FasterRCNN, got {type(model).__name__}")
        if hasattr(model.roi_heads, "mask_head"):
            raise ValueError("StaticPredictor covers the box branch only; Mask R-CNN runs through the eager model")
        if dtype not in AMP:
            raise ValueError(f"dtype={dtype!r}; use one of {sorted(AMP)}")
        if pooling not in (None, "all-levels", "grouped"):
            raise ValueError(f"pooling={pooling!r}; use 'all-levels', 'grouped' or None (by device)")
        if nms_iterations < 1 or max_candidates < 1:
            raise ValueError(f"nms_iterations ({nms_iterations}) and max_candidates ({max_candidates}) must be >= 1")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.canvas = canvas
        self.dtype = dtype
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.nms_iterations = nms_iterations
        self.fixed_iterations = self.cuda_graph if fixed_iterations is None else fixed_iterations
        self.max_candidates = max(max_candidates, model.roi_heads.detections_per_img)
        self.pooling = pooling or ("all-levels" if self.device.type == "cuda" else "grouped")
        self.backbone = torch.compile(model.backbone) if compile_backbone else model.backbone
        self._graphs: dict[tuple, tuple[Any, Tensor, Tensor, dict[str, Tensor]]] = {}
        self.fallbacks = 0  # batches that needed the eager model (a fixed-size step was not exact)

    # ------------------------------------------------------------------------------------ the graph
    def _autocast(self) -> contextlib.AbstractContextManager:
        if AMP[self.dtype] is None:
            return torch.autocast(self.device.type, enabled=False)
        return autocast(self.device, self.dtype)

    def forward_fixed(self, batch: Tensor, image_sizes: Tensor) -> dict[str, Tensor]:
        """The fixed-shape path: padded batch `(B, 3, H, W)` and `(B, 2)` sizes -> `boxes (B, D, 4)`,
        `scores (B, D)`, `labels (B, D)`, `valid (B, D)` (in the padded batch's coordinates) and `ok` (0-dim:
        every fixed-size step was exact). No host synchronisation with `fixed_iterations` and all-levels pooling."""
        m = self.model
        iters = self.nms_iterations if self.fixed_iterations else None
        with self._autocast():
            features = self.backbone(batch)
            rpn = m.rpn
            feats = [features[f] for f in rpn.in_features]
            logits, deltas = rpn.head(feats)
        logits, deltas = logits.float(), deltas.float()
        anchors_per_level = rpn.anchor_generator([tuple(f.shape[-2:]) for f in feats], feats[0].device,
                                                 image_size=tuple(batch.shape[-2:]))
        proposals, valid, ok = self._proposals(torch.cat(anchors_per_level), logits, deltas,
                                               [a.shape[0] for a in anchors_per_level], image_sizes, iters)
        heads = m.roi_heads
        b, p = valid.shape
        with self._autocast():
            box_feats = [features[f] for f in heads.in_features]
            batch_index = torch.arange(b, device=batch.device)[:, None].expand(b, p).reshape(-1)
            if self.pooling == "grouped":
                pooled = heads.box_pooler(box_feats, proposals.reshape(-1, 4), batch_index)
            else:
                pooled = self._pool_all_levels(box_feats, proposals.reshape(-1, 4), batch_index)
            cls_logits, box_deltas = heads.predictor(heads.box_head(pooled))
        out = self._postprocess(cls_logits, box_deltas, proposals, valid, image_sizes, iters)
        out["ok"] = out["ok"] & ok
        return out

    def _proposals(self, anchors: Tensor, logits: Tensor, deltas: Tensor, level_sizes: list[int],
                   image_sizes: Tensor, iters: int | None) -> tuple[Tensor, Tensor, Tensor]:
        """`RPN._proposals` with per-level cluster NMS (the same top-k, decoding, clipping and ordering)."""
        rpn = self.model.rpn
        pre, post = rpn.pre_nms_topk[1], rpn.post_nms_topk[1]
        boxes_l, probs_l, valid_l = [], [], []
        start = 0
        for n in level_sizes:
            k = min(pre, n)
            s, i = logits[:, start:start + n].topk(k, dim=1)  # sorted by decreasing score: NMS order
            i = i + start
            start += n
            boxes = rpn.box_coder.decode(deltas.gather(1, i[..., None].expand(-1, -1, 4)), anchors[i])
            boxes = clip_boxes(boxes, image_sizes[:, 0], image_sizes[:, 1])
            probs = torch.sigmoid(s)
            boxes_l.append(boxes)
            probs_l.append(probs)
            valid_l.append(nonempty(boxes, rpn.min_box_size) & (probs >= rpn.score_thresh))
        # One NMS for all levels (B, L, K, K), levels padded to the longest with invalid entries: a few kernels
        # per step instead of a few per level and step.
        ks = [v.shape[1] for v in valid_l]
        kmax = max(ks)
        boxes_pad = torch.stack([torch.cat([b, b.new_zeros(b.shape[0], kmax - b.shape[1], 4)], 1) for b in boxes_l], 1)
        valid_pad = torch.stack([torch.cat([v, v.new_zeros(v.shape[0], kmax - v.shape[1])], 1) for v in valid_l], 1)
        keep_pad, ok = cluster_nms(boxes_pad, valid_pad, rpn.nms_thresh, iterations=iters)
        keep = torch.cat([keep_pad[:, lvl, :k] for lvl, k in enumerate(ks)], 1)
        boxes, probs = torch.cat(boxes_l, 1), torch.cat(probs_l, 1)
        key = torch.where(keep, probs, torch.full_like(probs, -1.0))
        top_key, top = key.topk(min(post, key.shape[1]), dim=1)
        return boxes.gather(1, top[..., None].expand(-1, -1, 4)), top_key >= 0, ok

    def _pool_all_levels(self, features: Sequence[Tensor], boxes: Tensor, batch_index: Tensor) -> Tensor:
        pooler = self.model.roi_heads.box_pooler
        rois = torch.cat([batch_index.to(boxes.dtype)[:, None], boxes], dim=1).float()
        if len(features) == 1:
            return pooler._pool(features[0].float(), rois, pooler.scales[0])
        levels = pooler.level_of(rois[:, 1:])[:, None, None, None]
        out = None
        for lvl, (x, scale) in enumerate(zip(features, pooler.scales)):
            pooled = pooler._pool(x.float(), rois, scale)
            out = pooled if out is None else torch.where(levels == lvl, pooled, out)
        return out

    def _postprocess(self, logits: Tensor, deltas: Tensor, proposals: Tensor, valid: Tensor, image_sizes: Tensor,
                     iters: int | None) -> dict[str, Tensor]:
        """`RoIHeads.postprocess` on the `max_candidates` best class scores per image, fixed shapes."""
        heads = self.model.roi_heads
        b, p = valid.shape
        c = heads.num_classes
        scores = F.softmax(logits.float(), dim=-1).view(b, p, c)
        boxes = heads.box_coder.decode(deltas.float().view(b, p, -1), proposals).view(b, p, c, 4)
        boxes = clip_boxes(boxes.view(b, p * c, 4), image_sizes[:, 0], image_sizes[:, 1]).view(b, p, c, 4)
        boxes, scores = boxes[:, :, 1:], scores[:, :, 1:]  # drop the background class
        keep = valid[:, :, None] & (scores > heads.score_thresh) & nonempty(boxes, heads.min_box_size)
        flat = torch.where(keep, scores, torch.full_like(scores, -1.0)).reshape(b, -1)
        m = min(self.max_candidates, flat.shape[1])
        cand_scores, cand = flat.topk(m, dim=1)
        cand_valid = cand_scores >= 0
        cand_boxes = boxes.reshape(b, -1, 4).gather(1, cand[..., None].expand(-1, -1, 4))
        cand_class = cand % (c - 1)
        kept, converged = cluster_nms(cand_boxes, cand_valid, heads.nms_thresh, groups=cand_class, iterations=iters)
        survivors = torch.where(kept, cand_scores, torch.full_like(cand_scores, -1.0))
        d = min(heads.detections_per_img, m)
        top_scores, top = survivors.topk(d, dim=1)
        # exact when every candidate was considered, or when enough of the best ones survived
        complete = (keep.flatten(1).sum(1) <= m) | (kept.sum(1) >= heads.detections_per_img)
        return {"boxes": cand_boxes.gather(1, top[..., None].expand(-1, -1, 4)), "scores": top_scores,
                "labels": cand_class.gather(1, top) + 1, "valid": top_scores >= 0, "ok": converged & complete.all()}

    # ---------------------------------------------------------------------------------------- calls
    def _graph(self, batch: Tensor, image_sizes: Tensor) -> dict[str, Tensor]:
        key = (tuple(batch.shape), batch.dtype, batch.is_contiguous(memory_format=torch.channels_last))
        if key not in self._graphs:
            static_batch, static_sizes = batch.clone(), image_sizes.clone()
            # Autocast caches the casts of leaf tensors that require grad; casts cached during a capture must not
            # outlive it, so parameters stop requiring grad while the graph is made (each replay casts again).
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            for p in trainable:
                p.requires_grad_(False)
            try:
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):  # warm-up (lazy inits, anchors, cuDNN plans) off the capture
                    for _ in range(2):
                        self.forward_fixed(static_batch, static_sizes)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self.forward_fixed(static_batch, static_sizes)
            finally:
                for p in trainable:
                    p.requires_grad_(True)
            self._graphs[key] = (graph, static_batch, static_sizes, static_out)
        graph, static_batch, static_sizes, static_out = self._graphs[key]
        static_batch.copy_(batch)
        static_sizes.copy_(image_sizes)
        graph.replay()
        return static_out

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        check_images(images)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        # Normal (not inference-mode) tensors: the graph's buffers outlive this call's grad mode.
        with torch.inference_mode(False), torch.no_grad():
            batch, sizes, _ = self.model.preprocessor(images, fixed_size=self.canvas)
            image_sizes = torch.tensor(sizes, device=batch.device)
            out = self._graph(batch, image_sizes) if self.cuda_graph else self.forward_fixed(batch, image_sizes)
            valid, ok = torch.cat([out["valid"].flatten(), out["ok"].view(1)]).cpu().split(out["valid"].numel())
            if not bool(ok):
                self.fallbacks += 1
                return self._eager(batch, image_sizes, sizes, original_sizes)
            valid = valid.view(out["valid"].shape)
            detections = [{"boxes": out["boxes"][i][valid[i]], "scores": out["scores"][i][valid[i]],
                           "labels": out["labels"][i][valid[i]]} for i in range(len(images))]
            return self.model.postprocess(detections, sizes, original_sizes)

    def _eager(self, batch: Tensor, image_sizes: Tensor, sizes: list[tuple[int, int]],
               original_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """The eager model's heads on the same padded batch (the exact result when a fixed step was not)."""
        m = self.model
        with self._autocast():
            features = self.backbone(batch)
            proposals, valid, _ = m.rpn(features, image_sizes, None, tuple(batch.shape[-2:]))
            detections, _ = m.roi_heads(features, proposals, valid, image_sizes, None)
        return m.postprocess(detections, sizes, original_sizes)
