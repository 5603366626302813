"""Faster R-CNN (FPN and C4) with torchvision's calling convention."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from backbone.base import Backbone

from .preprocess import Preprocessor, check_images, check_targets
from .roi_heads import RoIHeads
from .rpn import RPN
from .specs import ModelSpec
from .structures import GroundTruth


@runtime_checkable
class ImageHead(Protocol):
    """A head that reads the backbone's maps and predicts per image, beside the RoI heads (the semantic head
    of Panoptic FPN is one). `FasterRCNN(..., image_heads={"semantic_head": head})` runs it in the one R-CNN
    forward: `out = head(features)`, then `head.losses(out, ...)` in training or `head.predict(out, ...)` in eval.

    - `check_targets(targets, original_sizes)`: raise `ValueError` naming the image for a target the head
      cannot train on (called before any computation, in training only);
    - `losses(out, targets, sizes, original_sizes, batch_size)` -> `{name: loss}` merged into the loss dict
      (`sizes`: each image's resized size, `batch_size`: the padded batch's `(H, W)`);
    - `predict(out, sizes, original_sizes)` -> one dict per image, merged into that image's outputs, at the
      image's own size.
    """

    def __call__(self, features: dict[str, Tensor]) -> Any: ...

    def check_targets(self, targets: Sequence[dict[str, Tensor]], original_sizes: Sequence[tuple[int, int]]
                      ) -> None: ...

    def losses(self, out: Any, targets: Sequence[dict[str, Tensor]], sizes: Sequence[tuple[int, int]],
               original_sizes: Sequence[tuple[int, int]], batch_size: tuple[int, int]) -> dict[str, Tensor]: ...

    def predict(self, out: Any, sizes: Sequence[tuple[int, int]], original_sizes: Sequence[tuple[int, int]]
                ) -> list[dict[str, Tensor]]: ...


class FasterRCNN(nn.Module):
    """Backbone (+FPN) -> RPN -> RoI heads, batched across images.

    Call it like torchvision's detectors:

    - training: `model(images, targets)` -> `dict[str, Tensor]` of losses;
    - eval: `model(images)` -> one dict per image with `boxes` (float `[D, 4]`, xyxy, in that image's
      own pixel coordinates), `scores` `[D]` and `labels` (int64 `[D]`, 1..num_classes-1).

    `images` is a list of float `[3, H, W]` RGB tensors in `[0, 1]` (sizes may differ); each target
    holds `boxes` (float `[K, 4]` xyxy pixels, `K` may be 0) and `labels` (int64 `[K]`).

    As torchvision's, eval outputs are differentiable when the call records gradients (`boxes` and `scores`
    carry `grad_fn`, back to the input images); run inference under `torch.no_grad()` or
    `torch.inference_mode()`, where nothing is recorded and the fast CPU pooling applies. `model.double()`
    computes in float64 end to end.

    This is the one R-CNN assembly: Mask R-CNN is this model with a mask branch in its RoI heads
    (`segmentation.MaskRoIHeads`), Panoptic FPN this model with a semantic head in `image_heads`; neither
    repeats the forward.

    Args:
        backbone: produces the maps the RPN and RoI heads read (`output_shape()` declares them).
        rpn: the region proposal network.
        roi_heads: the box branch, and any RoI-level branch of a subclass (the mask branch lives in
            `segmentation`); its `check_targets(targets)` runs on training targets.
        preprocessor: resizing, normalisation and batching.
        image_heads: `ImageHead`s on the backbone's maps, by attribute name (their parameters are
            `<name>.*` in the state dict), run after the RoI heads.
        spec: the `ModelSpec` the model was built from (the builders set it; None for hand-assembled parts).
    """

    spec: ModelSpec | None
    image_head_names: tuple[str, ...]

    def __init__(self, backbone: Backbone, rpn: RPN, roi_heads: RoIHeads, preprocessor: Preprocessor, *,
                 image_heads: Mapping[str, nn.Module] | None = None, spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.preprocessor = preprocessor
        self.spec = spec
        names = []
        for name, head in (image_heads or {}).items():
            if not isinstance(head, ImageHead) or not isinstance(head, nn.Module):
                raise TypeError(f"image_heads[{name!r}] is a {type(head).__name__}: an image head is an nn.Module "
                                "with check_targets / losses / predict (see detection.faster_rcnn.ImageHead)")
            if hasattr(self, name):
                raise ValueError(f"image_heads[{name!r}]: the name is taken by the model's {name!r}; pick another")
            self.add_module(name, head)
            names.append(name)
        self.image_head_names = tuple(names)

    @property
    def num_classes(self) -> int:
        """Number of classes including the background."""
        return self.roi_heads.num_classes

    def prepare_targets(self, targets: Sequence[dict[str, Tensor]], original_sizes: list[tuple[int, int]],
                        sizes: list[tuple[int, int]], device: torch.device) -> GroundTruth:
        scaled = []
        for t, o, s in zip(targets, original_sizes, sizes):
            boxes = t["boxes"].to(device=device, dtype=torch.float32)
            if o != s:
                boxes = Preprocessor.resize_boxes(boxes, o, s)
            scaled.append({**t, "boxes": boxes, "labels": t["labels"].to(device=device, dtype=torch.int64)})
        return GroundTruth.from_targets(scaled, device, image_sizes=list(sizes), original_sizes=list(original_sizes))

    def image_heads(self) -> dict[str, nn.Module]:
        """The `ImageHead`s by name, in the order they run."""
        return {name: getattr(self, name) for name in self.image_head_names}

    def check_training_targets(self, targets: Any, original_sizes: list[tuple[int, int]]) -> None:
        """Raise `ValueError` naming the image for a target the model cannot train on: boxes and labels, then
        what the RoI heads' other branches and the image heads need."""
        check_targets(targets, len(original_sizes), self.num_classes, original_sizes)
        extra_check = getattr(self.roi_heads, "check_targets", None)
        if callable(extra_check):
            extra_check(targets)
        for head in self.image_heads().values():
            head.check_targets(targets, original_sizes)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        check_images(images)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        if self.training:
            self.check_training_targets(targets, original_sizes)
        batch, sizes, _ = self.preprocessor(images)
        image_sizes = torch.tensor(sizes, device=batch.device)
        gt = self.prepare_targets(targets, original_sizes, sizes, batch.device) if self.training else None
        features = self.backbone(batch)
        proposals, valid, rpn_losses = self.rpn(features, image_sizes, gt, tuple(batch.shape[-2:]))
        detections, roi_losses = self.roi_heads(features, proposals, valid, image_sizes, gt)
        heads = self.image_heads()
        head_outputs = {name: head(features) for name, head in heads.items()}
        if self.training:
            assert targets is not None
            losses = {**rpn_losses, **roi_losses}
            batch_size = (int(batch.shape[-2]), int(batch.shape[-1]))
            for name, head in heads.items():
                losses.update(head.losses(head_outputs[name], targets, sizes, original_sizes, batch_size))
            return losses
        results = self.postprocess(detections, sizes, original_sizes)
        for name, head in heads.items():
            for r, extra in zip(results, head.predict(head_outputs[name], sizes, original_sizes)):
                r.update(extra)
        return results

    def nonfinite_images(self) -> list[int]:
        """Indices, in the last eval-mode batch, of the images that got no detections because the model produced
        non-finite values (NaN/inf) for them: in the RPN's candidates or in the box head's outputs.

        Reads two small device tensors (one host synchronisation): call it after an inference forward, not in a
        training step.
        """
        bad = None
        for flags in (getattr(self.rpn, "last_nonfinite", None), getattr(self.roi_heads, "last_nonfinite", None)):
            if isinstance(flags, Tensor) and (bad is None or flags.shape == bad.shape):
                bad = flags > 0 if bad is None else bad | (flags > 0)
        return [] if bad is None else bad.nonzero().flatten().tolist()

    def __prepare_scriptable__(self) -> nn.Module:
        """`torch.jit.script(model)` scripts this instead: an inference module of this model's own backbone and
        heads (shared, not copied) run by torchvision's scriptable R-CNN logic with this model's settings, which
        gives its detections (`detection.torchscript`); a setting without an exact equivalent raises
        `ValueError`. The scripted module returns `(losses, detections)`, as torchvision's scripted detectors."""
        from .torchscript import scriptable_detector

        return scriptable_detector(self)

    @staticmethod
    def postprocess(detections: list[dict[str, Tensor]], sizes: list[tuple[int, int]],
                    original_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Map boxes from the resized images back to each input image's coordinates."""
        for det, s, o in zip(detections, sizes, original_sizes):
            if s != o:
                det["boxes"] = Preprocessor.resize_boxes(det["boxes"], s, o)
        return detections

    @torch.no_grad()
    def prepare_for_inference(self, *, fold_bn: bool = True, channels_last: bool = True,
                              fuse: bool = True) -> FasterRCNN:
        """Fold frozen BN into the convolutions, switch to channels-last and, on CPUs, let convolutions fuse
        their bias, ReLU and residual / FPN additions into one oneDNN kernel (`fuse`); same detections
        (fp32: the same arithmetic), faster. Training on the prepared model takes the plain path."""
        from backbone.layers import enable_fused_inference, fold_frozen_batchnorm

        self.eval()
        if fold_bn:
            fold_frozen_batchnorm(self)
        enable_fused_inference(self, fuse)
        if channels_last:
            self.to(memory_format=torch.channels_last)
            self.preprocessor.channels_last = True
        return self
