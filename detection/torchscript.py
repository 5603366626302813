"""TorchScript for our R-CNNs: `torch.jit.script(model)` works on a `FasterRCNN` (and `segmentation.MaskRCNN`).

Our detectors' forward is not TorchScript (ground truth in a dataclass, the threaded CPU RoIAlign, the
non-finite bookkeeping, input checks with f-strings). Rather than annotate all of it, the detector classes
define torch.jit's documented hook `__prepare_scriptable__`: `torch.jit.script(model)` calls it and scripts
what it returns, `scriptable_detector(model)`, an inference module assembled from

- **our modules, the same objects** (parameters and buffers shared, nothing copied): the backbone (trunk +
  FPN), the RPN head's convolutions, the box head and box predictor, the mask head;
- **torchvision's R-CNN logic** for what runs between them (`GeneralizedRCNNTransform`, `AnchorGenerator`,
  `RegionProposalNetwork`, `MultiScaleRoIAlign`, `RoIHeads`), given every setting of ours: the resizing
  rule, anchors, top-k, NMS and score thresholds, the RoIAlign geometry, the box coder, the mask pasting.

Our eval path is written to compute what torchvision's does (`tests/detection/test_torchvision_parity.py`
proves the same detections), so the scripted module gives our eager detections;
`tests/detection/test_torchvision_conformance.py` compares them on the real images of `tests/data/tiny_coco`.
A configuration for which torchvision's logic computes something else raises `ValueError` here, naming the
setting and why (see `scriptable_detector`).

The scripted module follows torchvision's scripted convention: `scripted(images)` returns
`(losses, detections)` (losses empty in eval). It is for inference: in training mode it raises (training
runs on the eager model, whose losses and sampling are ours). The eager-only extras do not carry over:
`nonfinite_images()` (a scripted model returns whatever the numbers give for an image with NaN features)
and the fast CPU paths (`prepare_for_inference`'s fused kernels, threaded RoI pooling: the scripted module
runs the plain kernels, the same function).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads as TVRoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from .anchors import AnchorGenerator
from .faster_rcnn import FasterRCNN
from .poolers import RoIPooler
from .preprocess import Preprocessor
from .roi_heads import RoIHeads
from .rpn import RPN, RPNHead

__all__ = ["ScriptableDetector", "check_forward", "scriptable_detector"]


class _PerLevelRPNHead(nn.Module):
    """Our `RPNHead`'s modules (shared) with the output layout torchvision's RPN reads: per level, objectness
    `(N, A, H, W)` and deltas `(N, 4A, H, W)`; our head flattens the same values in the same (H, W, A) order."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.conv = head.conv
        self.objectness = head.objectness
        self.deltas = head.deltas

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits: list[Tensor] = []
        deltas: list[Tensor] = []
        for x in features:
            t = self.conv(x)
            logits.append(self.objectness(t))
            deltas.append(self.deltas(t))
        return logits, deltas


class ScriptableDetector(nn.Module):
    """What `torch.jit.script(model)` compiles for one of our R-CNNs (see the module docstring).

    `forward(images)` returns `(losses, detections)` as torchvision's scripted detectors do (losses: an
    empty dict); eager too, so the module behaves the same before and after scripting.
    """

    def __init__(self, rcnn: nn.Module, source: str) -> None:
        super().__init__()
        self.rcnn = rcnn
        self.source = source

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
        if self.training:
            raise RuntimeError("the TorchScript module of " + self.source + " is for inference: call .eval() on "
                               "it; train the eager model (its losses and sampling are ours, not torchvision's)")
        if torch.jit.is_scripting():
            return self.rcnn(images, targets)
        return {}, self.rcnn(images, targets)


def _unsupported(model: nn.Module, what: str) -> ValueError:
    return ValueError(f"torch.jit.script({type(model).__name__}): {what}")


def check_forward(model: nn.Module, reproduces: type[nn.Module]) -> None:
    """`ValueError` unless `model`'s forward is `reproduces.forward` (the one the scripted module computes)."""
    if not isinstance(model, reproduces) or type(model).forward is not reproduces.forward:
        raise _unsupported(model, f"{type(model).__name__} overrides {reproduces.__name__}.forward, so what it adds "
                                  "has no TorchScript equivalent here; only FasterRCNN and MaskRCNN themselves script")
    heads = tuple(getattr(model, "image_head_names", ()))
    if heads:
        raise _unsupported(model, f"its image heads {list(heads)} (e.g. PanopticFPN's semantic head) have no "
                                  "TorchScript equivalent here; script the model without them")


def _multiscale_roi_align(pooler: RoIPooler, names: tuple[str, ...], model: nn.Module, where: str) -> nn.Module:
    """torchvision's `MultiScaleRoIAlign` with our pooler's geometry, or `ValueError` where it has none."""
    if pooler.pooler_type != "roi_align":
        raise _unsupported(model, f"{where}.pooler_type={pooler.pooler_type!r} has no TorchScript equivalent: "
                                  "torchvision's MultiScaleRoIAlign pools with RoIAlign without the half-pixel "
                                  "offset only ('roi_align'); script a model built with pooler_type='roi_align'")
    return MultiScaleRoIAlign(list(names), pooler.output_size, pooler.sampling_ratio,
                              canonical_scale=pooler.canonical_box_size, canonical_level=pooler.canonical_level)


def scriptable_detector(model: FasterRCNN, *, reproduces: type[FasterRCNN] | None = None,
                        mask: tuple[RoIPooler, nn.Module] | None = None) -> ScriptableDetector:
    """The module `torch.jit.script(model)` compiles for our `FasterRCNN` (see the module docstring); the mask
    branch of `segmentation.MaskRCNN` comes as `mask=(mask_pooler, mask_head)`, and `reproduces` names the class
    whose `forward` the result computes (default `FasterRCNN`).

    Settings torchvision's logic has too are passed on (thresholds, top-k, anchors, sizes, normalisation,
    box-coder weights and clip, the RPN's minimum box size); these raise `ValueError`, as torchvision's logic
    has no equivalent of them:

    - `preprocessor.fixed_size` (torchvision's `fixed_size` resizes to that size; ours pads to it), and
      `test_min_size` None / 0 (torchvision's transform always resizes at inference);
    - anchor strides that are not torchvision's (`torchvision_anchor_strides=False` with a level whose stride
      does not divide the padding multiple, e.g. P6 of an FPN): torchvision derives each level's stride
      from the padded image and the feature map, `H // h`;
    - `roi.pooler_type` other than "roi_align" (torchvision's MultiScaleRoIAlign is RoIAlign with
      `aligned=False`);
    - a box branch dropping boxes smaller than anything but 0.01 px (torchvision's value, fixed in its code);
    - an RPN that does not read every backbone output, in order (torchvision's feeds them all to it);
    - any module of another class than ours, a model class that overrides `forward` (a subclass of yours), or
      image heads (`PanopticFPN`'s semantic head): not what torchvision's logic reproduces.
    """
    name = type(model).__name__
    check_forward(model, reproduces or FasterRCNN)
    p, rpn, heads = model.preprocessor, model.rpn, model.roi_heads
    parts = {"preprocessor": (p, Preprocessor), "rpn": (rpn, RPN), "rpn.head": (rpn.head, RPNHead),
             "rpn.anchor_generator": (rpn.anchor_generator, AnchorGenerator), "roi_heads.box_pooler":
             (heads.box_pooler, RoIPooler)}
    for where, (module, cls) in parts.items():
        if type(module) is not cls:
            raise _unsupported(model, f"model.{where} is a {type(module).__name__}, not our {cls.__name__}: only our "
                                      "own parts have a TorchScript equivalent here")
    if not isinstance(heads, RoIHeads):
        raise _unsupported(model, f"model.roi_heads is a {type(heads).__name__}, not our RoIHeads")

    # Preprocessing.
    if p.fixed_size is not None:
        raise _unsupported(model, f"preprocessor.fixed_size={p.fixed_size} (static shapes) has no TorchScript "
                                  "equivalent: torchvision's transform resizes to a fixed size where ours pads to "
                                  "it; script a model with fixed_size=None (the default)")
    if not p.test_min_size:
        raise _unsupported(model, f"test_min_size={p.test_min_size!r} (no resizing at inference) has no TorchScript "
                                  "equivalent: torchvision's transform always resizes; give the size the images "
                                  "have, e.g. test_min_size=800, test_max_size=1333")
    transform = GeneralizedRCNNTransform(min_size=int(p.test_min_size), max_size=int(p.test_max_size),
                                         image_mean=p.pixel_mean.flatten().tolist(),
                                         image_std=p.pixel_std.flatten().tolist(),
                                         size_divisible=int(p.size_divisibility))

    # RPN: every backbone output, in order.
    outputs = tuple(model.backbone.output_shape())
    if tuple(rpn.in_features) != outputs:
        raise _unsupported(model, f"the RPN reads {tuple(rpn.in_features)} but the backbone gives {outputs}: "
                                  "torchvision's RPN runs on every backbone output")
    ag = rpn.anchor_generator
    if not ag.torchvision_strides:
        odd = [s for s in ag.strides if p.size_divisibility % s]
        if odd:
            raise _unsupported(model, f"anchor strides {ag.strides} with torchvision_anchor_strides=False: torchvision "
                                      "derives a level's stride as padded side // feature side, which differs from "
                                      f"the nominal stride {odd} (it does not divide the padding multiple "
                                      f"{p.size_divisibility}); build the model with torchvision_anchor_strides=True "
                                      "(the torchvision-named builders do) to script it")
    anchors = TVAnchorGenerator(tuple(ag.sizes), tuple(ag.aspect_ratios))
    anchors.cell_anchors = [a.clone() for a in ag.cell_anchors]  # ours, rounded as torchvision's
    tv_rpn = RegionProposalNetwork(
        anchors, _PerLevelRPNHead(rpn.head), rpn.matcher.high, rpn.matcher.low, rpn.batch_size_per_image,
        rpn.positive_fraction, {"training": rpn.pre_nms_topk[0], "testing": rpn.pre_nms_topk[1]},
        {"training": rpn.post_nms_topk[0], "testing": rpn.post_nms_topk[1]}, rpn.nms_thresh,
        score_thresh=rpn.score_thresh)
    tv_rpn.min_size = rpn.min_box_size
    tv_rpn.box_coder.bbox_xform_clip = rpn.box_coder.clip

    # RoI heads.
    if not math.isclose(heads.min_box_size, 1e-2):
        raise _unsupported(model, f"roi_heads.min_box_size={heads.min_box_size}: torchvision's post-processing drops "
                                  "boxes below 0.01 px, a value fixed in its code; script a model with the default")
    box_pool = _multiscale_roi_align(heads.box_pooler, heads.in_features, model, "roi")
    extra = {}
    if mask is not None:
        mask_pooler, mask_head = mask
        extra = {"mask_roi_pool": _multiscale_roi_align(mask_pooler, heads.in_features, model, "mask"),
                 "mask_head": mask_head, "mask_predictor": nn.Identity()}  # our head ends with the logits
    tv_heads = TVRoIHeads(box_pool, heads.box_head, heads.predictor, heads.matcher.high, heads.matcher.low,
                          heads.batch_size_per_image, heads.positive_fraction, heads.box_coder.weights,
                          heads.score_thresh, heads.nms_thresh, heads.detections_per_img, **extra)
    tv_heads.box_coder.bbox_xform_clip = heads.box_coder.clip
    rcnn = GeneralizedRCNN(model.backbone, tv_rpn, tv_heads, transform)
    out = ScriptableDetector(rcnn, name)
    out.train(model.training)
    return out
