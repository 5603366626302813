"""Export a Faster R-CNN (FPN or C4) to ONNX or to a `torch.export` program that maps one image to final boxes.

The exported graph holds everything between the decoded image and the final detections, so ONNX Runtime alone
(or `torch.export.load` + torchvision's ops) runs the detector:

    image uint8 (H, W, 3) RGB  ->  to [0, 1], normalise, resize (the model's test_min_size / test_max_size rule),
    pad to the backbone's size divisibility -> backbone (+FPN) -> RPN (anchors, top-k per level, box decoding,
    NMS per level, top-k per image) -> RoIAlign per FPN level -> box head -> softmax, class-specific boxes,
    score threshold, per-class NMS, top detections -> boxes back in the input image's pixels
    (-> mask head, masks pasted at the image size, for Mask R-CNN: `segmentation.export`).

Outputs: `boxes` float32 `(D, 4)` xyxy in the input image's pixels, `scores` float32 `(D,)`, `labels` int64 `(D,)`
(1..num_classes, the model's labels), and for Mask R-CNN `masks` float32 `(D, 1, H, W)` probabilities. `H`
and `W` are dynamic: one exported file serves images of every size. One image per call (the batch dimension
of the eager model is the list of images; images of different sizes cannot share one tensor).

Batches of same-size images are not supported, by decision (2026-12-02): every stage after the backbone has
per-image data-dependent sizes (the proposals after NMS, the detections), so a batched graph would need either
one copy of the RPN and heads per image (`torch.export` unrolls a Python loop only over a batch size fixed at
export time) or padded outputs plus an image index, a new output contract for `resnet-det infer --onnx` and every
client. What a batch would speed up is the backbone, and ONNX Runtime already spreads one image over its intra-op
threads (the gain of batching was not measured). Call the session once per image, or run several sessions.

Eager and exported models compute the same detections: the same operations in the same order; the NMS
steps are exact per group (per FPN level in the RPN, per class after the box head): in ONNX the per-class NMS
is one `NonMaxSuppression` whose batch axis is the class (no coordinate offsets, whose float32 rounding could
flip a decision), in the `torch.export` program the groups are offset apart in float64 (torchvision's NMS kernel
takes doubles), as the eager model does on GPUs.

Functions: `export_onnx(model, path)`, `export_program(model, path)` (`torch.export.save`),
`load_program(path)`; `DetectorForExport(model)` is the traceable module both export.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import nms, roi_align, roi_pool

from resnet_det_common.io import atomic_write, writing

from .boxes import clip_boxes, nonempty
from .faster_rcnn import FasterRCNN

__all__ = ["FORMATS", "DetectorForExport", "check_detector", "example_image", "export", "export_onnx", "export_program",
           "grouped_nms", "load_program", "pool_rois"]

FORMATS = ("onnx", "torch-export")
ONNX_OPSET = 18
# The NMS op of the ONNX graph: NonMaxSuppression over (group, candidate) with the group as the batch axis.
_GROUPED_NMS = "resnetdet::grouped_nms"


# ---------------------------------------------------------------------------------------- grouped NMS
@torch.library.custom_op(_GROUPED_NMS, mutates_args=())
def grouped_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS in each group independently.

    Args:
        boxes: `(G, N, 4)` xyxy, float32.
        scores: `(G, N)`; candidates with a negative score take no part (neither kept nor suppressing).
        iou_threshold: a box is suppressed by a kept box of the same group with IoU `> iou_threshold`.

    Returns:
        `(K, 2)` int64 `(group, index)` of the kept boxes, each group's by decreasing score.
    """
    out = []
    for g in range(boxes.shape[0]):
        idx = (scores[g] >= 0).nonzero().squeeze(1)
        kept = idx[nms(boxes[g, idx], scores[g, idx], iou_threshold)]
        out.append(torch.stack([torch.full_like(kept, g), kept], dim=1))
    return torch.cat(out) if out else boxes.new_zeros((0, 2), dtype=torch.int64)


@grouped_nms.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k, 2), dtype=torch.int64)


def _grouped_nms_onnx(boxes, scores, iou_threshold: float):
    """ONNX translation of `grouped_nms`: `NonMaxSuppression` with the groups as its batch axis."""
    from onnxscript import opset18 as op

    selected = op.NonMaxSuppression(boxes, op.Unsqueeze(scores, [1]), op.Constant(value_ints=[2**31 - 1]),
                                    op.Constant(value_floats=[iou_threshold]), op.Constant(value_floats=[-0.5]))
    # selected: (K, 3) = (batch = group, class = 0, box index)
    return op.Concat(op.Slice(selected, [0], [1], [1]), op.Slice(selected, [2], [3], [1]), axis=1)


def _grouped_nms_float64(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """`grouped_nms` with torchvision's NMS on groups offset apart in float64 (exact: the offsets do not round
    the boxes), for the `torch.export` program: standard torchvision ops only."""
    n = scores.shape[1]
    flat = (scores.flatten() >= 0).nonzero().squeeze(1)
    b = boxes.reshape(-1, 4)[flat].double()
    group = flat // n
    # torchvision's coordinate trick; the zero keeps max() defined without candidates
    span = torch.cat([b.reshape(-1), b.new_zeros(1)]).max() + 1
    offsets = group.to(torch.float64) * span
    kept = flat[nms(b + offsets[:, None], scores.flatten()[flat].double(), iou_threshold)]
    return torch.stack([kept // n, kept % n], dim=1)


# ---------------------------------------------------------------------------------------- pooling
def pool_rois(pooler: nn.Module, features: Sequence[Tensor], boxes: Tensor) -> Tensor:
    """`RoIPooler` of `(K, 4)` boxes of one image (xyxy, the padded batch's pixels) -> `(K, C, R, R)`, traceable.

    Each box is pooled from the level `pooler.level_of` picks (the eager rule): each level pools its own boxes
    (one ONNX `RoiAlign` per level) and the results are scattered back in the boxes' order.
    """
    rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1).float()
    feats = [f.float() for f in features]
    if len(feats) == 1:
        return _pool_level(pooler, feats[0], rois, pooler.scales[0])
    levels = pooler.level_of(rois[:, 1:])
    out = rois.new_zeros((rois.shape[0], feats[0].shape[1], pooler.output_size, pooler.output_size))
    for lvl, (x, scale) in enumerate(zip(feats, pooler.scales)):
        idx = (levels == lvl).nonzero().squeeze(1)
        out = out.index_put((idx,), _pool_level(pooler, x, rois[idx], scale))
    return out


def _pool_level(pooler: nn.Module, x: Tensor, rois: Tensor, scale: float) -> Tensor:
    if pooler.pooler_type == "roi_pool":
        return roi_pool(x, rois, pooler.output_size, scale)
    return roi_align(x, rois, pooler.output_size, scale, pooler.sampling_ratio,
                     aligned=pooler.pooler_type == "roi_align_v2")


# ------------------------------------------------------------------------------------------- module
class DetectorForExport(nn.Module):
    """The eval path of a `FasterRCNN` (FPN or C4) for one image, written with traceable ops only.

    Shares the model's modules (no copy of the weights). `forward(image)` takes uint8 `(H, W, 3)` RGB and returns
    `(boxes (D, 4) xyxy input pixels, scores (D,), labels (D,) int64)`, the eager model's
    `model([image.permute(2, 0, 1) / 255])[0]`.

    Args:
        model: the detector (its settings: resize rule, normalisation, top-k, thresholds, are read here).
        nms_backend: "onnx" (the grouped NMS as one ONNX `NonMaxSuppression`) or "torchvision" (standard torch
            and torchvision ops only, for `torch.export`).
        mask_branch: for Mask R-CNN, a module `(features, boxes_resized, labels, boxes, image_hw) -> masks`
            (`segmentation.export.MaskBranchForExport`); None for Faster R-CNN.
    """

    def __init__(self, model: FasterRCNN, *, nms_backend: str = "onnx", mask_branch: nn.Module | None = None) -> None:
        super().__init__()
        check_detector(model)
        if nms_backend not in ("onnx", "torchvision"):
            raise ValueError(f"nms_backend={nms_backend!r}; use 'onnx' or 'torchvision'")
        pre = model.preprocessor
        self.backbone, self.rpn, self.roi_heads = model.backbone, model.rpn, model.roi_heads
        self.mask_branch = mask_branch
        self.nms_backend = nms_backend
        self.register_buffer("pixel_mean", pre.pixel_mean.detach().clone().float(), persistent=False)
        self.register_buffer("pixel_std", pre.pixel_std.detach().clone().float(), persistent=False)
        self.resize = (float(pre.test_min_size), float(pre.test_max_size)) if pre.test_min_size else None
        self.size_divisibility = max(1, int(pre.size_divisibility))
        for i, a in enumerate(self.rpn.anchor_generator.cell_anchors):  # buffers: they follow .to(device)
            self.register_buffer(f"cell_anchors_{i}", a.clone(), persistent=False)

    # ------------------------------------------------------------------------------------ input
    def preprocess(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """uint8 `(H, W, 3)` -> the padded `(1, 3, Hp, Wp)` batch, the resized `(h, w)` and the input `(H, W)`
        as float32 0-dim tensors (for clipping and mapping the boxes back)."""
        x = image.permute(2, 0, 1).to(torch.float32) / 255.0
        x = (x - self.pixel_mean) / self.pixel_std
        h_in, w_in = image.shape[0], image.shape[1]
        if self.resize is not None:
            # The eager rule (`resize_scale`, then F.interpolate's floor(side * scale)), in float64 as Python does.
            hw = torch.stack([torch.ones((), dtype=torch.float64) * h_in, torch.ones((), dtype=torch.float64) * w_in])
            scale = torch.minimum(self.resize[0] / hw.min(), self.resize[1] / hw.max())
            out = torch.floor(hw * scale).to(torch.int64)
        else:
            out = torch.stack([torch.ones((), dtype=torch.int64) * h_in, torch.ones((), dtype=torch.int64) * w_in])
        d = self.size_divisibility
        # The padded size as (number of d-blocks) * d: sizes of that form keep the symbolic shapes of every
        # strided convolution simple (export time), where ceil(h / d) * d nested in each layer's floor does not.
        blocks = (out + d - 1) // d
        h, w, bh, bw = out[0].item(), out[1].item(), blocks[0].item(), blocks[1].item()
        for v in (h, w, bh, bw):
            torch._check(v >= 1)
        torch._check(bh * d >= h)
        torch._check(bw * d >= w)
        hp, wp = bh * d, bw * d
        if self.resize is not None:
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)
        else:
            x = x[None]
        x = F.pad(x, (0, wp - w, 0, hp - h))
        size = torch.stack([torch.ones(()) * h, torch.ones(()) * w])
        original = torch.stack([torch.ones(()) * h_in, torch.ones(()) * w_in])
        return x, size, original

    # --------------------------------------------------------------------------------------- RPN
    def anchors(self, feats: Sequence[Tensor], padded: tuple[int, int]) -> list[Tensor]:
        """The anchor generator's anchors per level, `(h*w*A, 4)`, computed in the graph (no size cache)."""
        gen = self.rpn.anchor_generator
        out = []
        for i, f in enumerate(feats):
            gh, gw = f.shape[-2], f.shape[-1]
            if gen.torchvision_strides:
                sh, sw = padded[0] // gh, padded[1] // gw
            else:
                sh = sw = gen.strides[i]
            shifts_x = torch.arange(0, gw, dtype=torch.int32, device=f.device) * sw
            shifts_y = torch.arange(0, gh, dtype=torch.int32, device=f.device) * sh
            sy, sx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            sx, sy = sx.reshape(-1), sy.reshape(-1)
            shifts = torch.stack((sx, sy, sx, sy), dim=1)
            base = getattr(self, f"cell_anchors_{i}")
            out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4).to(torch.float32))
        return out

    def nms(self, boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
        """`grouped_nms` of `(G, N, 4)` boxes and `(G, N)` scores (negative: no candidate) -> `(K, 2)`."""
        if self.nms_backend == "onnx":
            return grouped_nms(boxes.contiguous(), scores.contiguous(), iou_threshold)
        return _grouped_nms_float64(boxes, scores, iou_threshold)

    def proposals(self, features: dict[str, Tensor], padded: tuple[int, int], size: Tensor) -> tuple[Tensor, Tensor]:
        """The RPN's `(post_nms_topk, 4)` proposals in the resized image, by decreasing objectness, and their
        validity `(post_nms_topk,)` (an image may have fewer).

        Every shape after the per-level top-k is static: a level's logits are padded with `pre_nms_topk` -inf
        entries (marked invalid), so the top-k takes exactly `pre_nms_topk` of each level; the valid ones are
        the eager model's `min(pre_nms_topk, level size)` candidates.
        """
        rpn = self.rpn
        feats = [features[f] for f in rpn.in_features]
        logits, deltas = rpn.head(feats)
        logits, deltas = logits[0].float(), deltas[0].float()
        anchors = self.anchors(feats, padded)
        pre, post = rpn.pre_nms_topk[1], rpn.post_nms_topk[1]
        boxes_l, scores_l = [], []
        start = 0
        for a in anchors:
            n = a.shape[0]
            level = torch.cat([logits[start:start + n], logits.new_full((pre,), float("-inf"))])
            s, i = level.topk(pre)
            real = i < n
            i = torch.where(real, i, torch.zeros_like(i))
            b = rpn.box_coder.decode(deltas[start:start + n][i], a[i])
            b = clip_boxes(b[None], size[0:1], size[1:2])[0]
            p = torch.sigmoid(s)
            valid = real & nonempty(b, rpn.min_box_size) & (p >= rpn.score_thresh)
            boxes_l.append(b)
            scores_l.append(torch.where(valid, p, torch.full_like(p, -1.0)))
            start += n
        boxes, scores = torch.stack(boxes_l), torch.stack(scores_l)  # (L, pre, 4), (L, pre)
        kept = self.nms(boxes, scores, rpn.nms_thresh)  # NMS per level, as the eager model
        flat = kept[:, 0] * pre + kept[:, 1]
        survived = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device).index_fill(0, flat, True)
        key = torch.where(survived, scores.flatten(), torch.full_like(scores.flatten(), -1.0))
        top_key, top = key.topk(min(post, key.shape[0]))
        return boxes.reshape(-1, 4)[top], top_key >= 0

    # --------------------------------------------------------------------------------- RoI heads
    def detect(self, features: dict[str, Tensor], proposals: Tensor, valid: Tensor, size: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Box head + post-processing (`RoIHeads.postprocess` for one image): `(boxes, scores, labels)` in the
        resized image, by decreasing score."""
        heads = self.roi_heads
        pooled = pool_rois(heads.box_pooler, [features[f] for f in heads.in_features], proposals)
        logits, deltas = heads.predictor(heads.box_head(pooled))
        p, c = proposals.shape[0], heads.num_classes
        scores = F.softmax(logits.float(), dim=-1)
        boxes = heads.box_coder.decode(deltas, proposals).view(p, c, 4)
        boxes = clip_boxes(boxes.view(1, p * c, 4), size[0:1], size[1:2]).view(p, c, 4)
        boxes, scores = boxes[:, 1:].transpose(0, 1), scores[:, 1:].t()  # (C-1, P, 4), (C-1, P): class-major
        keep = valid[None] & (scores > heads.score_thresh) & nonempty(boxes, heads.min_box_size)
        masked = torch.where(keep, scores, torch.full_like(scores, -1.0))
        kept = self.nms(boxes, masked, heads.nms_thresh)  # per class
        cls, idx = kept[:, 0], kept[:, 1]
        kept_scores = masked[cls, idx]
        top_scores, top = kept_scores.topk(torch.sym_min(heads.detections_per_img, kept_scores.shape[0]))
        return boxes[cls[top], idx[top]], top_scores, cls[top] + 1

    # ----------------------------------------------------------------------------------- forward
    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        """uint8 `(H, W, 3)` RGB -> `boxes (D, 4)` (xyxy, the input's pixels), `scores (D,)`, `labels (D,)`
        (+ `masks (D, 1, H, W)` with a mask branch)."""
        x, size, original = self.preprocess(image)
        features = self.backbone(x)
        proposals, valid = self.proposals(features, (x.shape[-2], x.shape[-1]), size)
        boxes, scores, labels = self.detect(features, proposals, valid, size)
        ratio = (original / size).flip(0).repeat(2)  # (w, h, w, h): the eager resize_boxes arithmetic
        out_boxes = boxes * ratio
        if self.mask_branch is None:
            return out_boxes, scores, labels
        masks = self.mask_branch(features, boxes, labels, out_boxes, (image.shape[0], image.shape[1]))
        return out_boxes, scores, labels, masks


# ------------------------------------------------------------------------------------------ checks
def check_detector(model: object) -> None:
    """Raise `TypeError` unless `model` is a `FasterRCNN` (or a subclass such as `MaskRCNN`) this module exports."""
    if not isinstance(model, FasterRCNN):
        raise TypeError(f"export needs a detection.FasterRCNN or segmentation.MaskRCNN, got {type(model).__name__}; "
                        "semantic and panoptic models have no export path yet")
    if hasattr(model, "semantic_head"):
        raise TypeError(f"{type(model).__name__} has a semantic head, which the export does not cover; export a "
                        "Faster R-CNN or Mask R-CNN")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


def example_image(height: int = 480, width: int = 640, seed: int = 0) -> Tensor:
    """A seeded random uint8 `(H, W, 3)` image: the example input of the exports (its size is not baked in)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=g)


def _wrap(model: FasterRCNN, nms_backend: str, mask_branch: nn.Module | None) -> DetectorForExport:
    if mask_branch is None and hasattr(model.roi_heads, "mask_head"):
        raise ValueError(f"{type(model).__name__} has a mask head: export it with segmentation.export (which "
                         "pastes the masks in the graph), e.g. segmentation.export.export_onnx(model, path)")
    return DetectorForExport(model, nms_backend=nms_backend, mask_branch=mask_branch).eval()


def _output_names(wrapped: DetectorForExport) -> list[str]:
    return ["boxes", "scores", "labels"] + (["masks"] if wrapped.mask_branch is not None else [])


def _export_program(wrapped: DetectorForExport, example: Tensor) -> torch.export.ExportedProgram:
    dims = {0: torch.export.Dim("height", min=2, max=8192), 1: torch.export.Dim("width", min=2, max=8192)}
    with torch.no_grad():
        return torch.export.export(wrapped, (example,), dynamic_shapes=({**dims},), strict=False)


def _save(path: Path, what: str, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temporary file in ``path``'s folder (created), then moved into place
    (:func:`atomic_write`): a failed write (a full disk) leaves no half file and no previous file harmed, and
    raises :class:`~resnet_det_common.io.OutputWriteError`, one line naming ``path``."""
    with writing(path, what):
        return atomic_write(path, write)


# ------------------------------------------------------------------------------------------ public
def export_onnx(model: FasterRCNN, path: str | os.PathLike, *, example: Tensor | None = None,
                mask_branch: nn.Module | None = None, opset: int = ONNX_OPSET) -> Path:
    """Export `model` to an ONNX file that ONNX Runtime runs alone: uint8 `(H, W, 3)` RGB in, final detections
    out (see the module docstring); `H` and `W` are dynamic.

    Args:
        model: a `FasterRCNN` (FPN or C4; Mask R-CNN through `segmentation.export.export_onnx`).
        path: the `.onnx` file to write (its folder is created).
        example: the example image (default `example_image()`); its size is not baked into the graph.
        mask_branch: see `DetectorForExport`.
        opset: ONNX opset (>= 16 for RoiAlign's `coordinate_transformation_mode`).

    Returns:
        The path written.

    Raises:
        OutputWriteError: the file could not be written (e.g. a full disk): no half file is left, a previous
            file at `path` is untouched.
    """
    check_detector(model)
    path = Path(path)
    wrapped = _wrap(model, "onnx", mask_branch)
    example = example_image() if example is None else example
    program = _export_program(wrapped, example)
    table: dict[Callable, Callable] = {torch.ops.resnetdet.grouped_nms.default: _grouped_nms_onnx}
    onnx_program = torch.onnx.export(program, (example,), input_names=["image"], output_names=_output_names(wrapped),
                                     opset_version=opset, dynamo=True, custom_translation_table=table,
                                     external_data=False, optimize=True, verify=False, report=False)
    return _save(path, "ONNX file", lambda tmp: onnx_program.save(str(tmp), external_data=False))


def export_program(model: FasterRCNN, path: str | os.PathLike, *, example: Tensor | None = None,
                   mask_branch: nn.Module | None = None) -> Path:
    """Export `model` with `torch.export` (standard torch and torchvision ops only) and save it with
    `torch.export.save`; `load_program(path)` (or `import torchvision; torch.export.load(path)`) loads it back.

    Args and returns: as `export_onnx`.
    """
    check_detector(model)
    path = Path(path)
    wrapped = _wrap(model, "torchvision", mask_branch)
    program = _export_program(wrapped, example_image() if example is None else example)

    # Serialised in memory first: torch's archive writer aborts the process (a C++ exception in its
    # destructor) when the disk fills under it, whereas a plain write raises ENOSPC as an OSError.
    buffer = io.BytesIO()
    torch.export.save(program, buffer)

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            f.write(buffer.getbuffer())

    return _save(path, "torch.export program", write)


def load_program(path: str | os.PathLike) -> Callable[[Tensor], tuple[Tensor, ...]]:
    """The module of a program saved by `export_program`: `load_program(path)(image_uint8_hwc)`."""
    import torchvision  # noqa: F401  (registers the torchvision ops the program calls)

    return torch.export.load(str(path)).module()


def export(model: FasterRCNN, path: str | os.PathLike, fmt: str = "onnx", **kwargs) -> Path:
    """`export_onnx` or `export_program` by `fmt` ("onnx" or "torch-export")."""
    _check_format(fmt)
    return export_onnx(model, path, **kwargs) if fmt == "onnx" else export_program(model, path, **kwargs)


