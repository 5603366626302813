"""Load torchvision detection checkpoints into our detectors.

`load_torchvision_detector(model, path_or_state_dict)` maps the keys of torchvision's
`fasterrcnn_resnet50_fpn(_v2)` (and `maskrcnn_resnet50_fpn(_v2)`, for the mask branch of
`segmentation`) onto ours, strictly: every key must find its place and every shape must match.
"""

from __future__ import annotations

import os
import re

from torch import Tensor, nn

from backbone.weights import WeightsError, convert_torchvision_resnet, read_state_dict


def convert_torchvision_detection(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision `*rcnn_resnet50_fpn*` state dict -> our key layout."""
    out: dict[str, Tensor] = {}
    body = {k[len("backbone.body."):]: v for k, v in sd.items() if k.startswith("backbone.body.")}
    for k, v in convert_torchvision_resnet(body).items():
        out["backbone.bottom_up." + k[len("body."):]] = v
    for k, v in sd.items():
        if k.startswith("backbone.body."):
            continue
        nk = None
        if m := re.match(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", k):
            nk = f"backbone.{'lateral' if m.group(1) == 'inner' else 'output'}.{m.group(2)}.{m.group(3)}"
        elif m := re.match(r"^backbone\.fpn\.(inner|layer)_blocks\.(\d+)\.1\.(.+)$", k):
            nk = f"backbone.{'lateral' if m.group(1) == 'inner' else 'output'}.{m.group(2)}.norm.{m.group(3)}"
        elif m := re.match(r"^rpn\.head\.conv\.(\d+)\.0\.(weight|bias)$", k):
            nk = f"rpn.head.conv.{m.group(1)}.{m.group(2)}"
        elif m := re.match(r"^rpn\.head\.conv\.(weight|bias)$", k):  # torchvision < 0.13 layout
            nk = f"rpn.head.conv.0.{m.group(1)}"
        elif k.startswith("rpn.head.cls_logits."):
            nk = "rpn.head.objectness." + k.split(".")[-1]
        elif k.startswith("rpn.head.bbox_pred."):
            nk = "rpn.head.deltas." + k.split(".")[-1]
        elif m := re.match(r"^roi_heads\.box_head\.(fc6|fc7)\.(weight|bias)$", k):
            nk = f"roi_heads.box_head.{m.group(1)}.{m.group(2)}"
        elif m := re.match(r"^roi_heads\.box_head\.(\d+)\.0\.weight$", k):  # v2: conv + BN blocks
            nk = f"roi_heads.box_head.convs.{m.group(1)}.weight"
        elif m := re.match(r"^roi_heads\.box_head\.(\d+)\.1\.(.+)$", k):
            nk = f"roi_heads.box_head.convs.{m.group(1)}.norm.{m.group(2)}"
        elif m := re.match(r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$", k):  # v2: the fc after Flatten
            nk = f"roi_heads.box_head.fc.{m.group(2)}"
        elif m := re.match(r"^roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)$", k):
            nk = f"roi_heads.predictor.{m.group(1)}.{m.group(2)}"
        elif m := re.match(r"^roi_heads\.mask_head\.(?:mask_fcn(\d+)|(\d+)\.0)\.(weight|bias)$", k):
            idx = int(m.group(1)) - 1 if m.group(1) else int(m.group(2))
            nk = f"roi_heads.mask_head.convs.{idx}.{m.group(3)}"
        elif m := re.match(r"^roi_heads\.mask_head\.(\d+)\.1\.(.+)$", k):
            nk = f"roi_heads.mask_head.convs.{m.group(1)}.norm.{m.group(2)}"
        elif m := re.match(r"^roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)\.(weight|bias)$", k):
            nk = f"roi_heads.mask_head.{'deconv' if m.group(1) == 'conv5_mask' else 'predictor'}.{m.group(2)}"
        if nk is None:
            raise WeightsError(f"unrecognised torchvision detection key {k!r}")
        out[nk] = v
    return out


def load_torchvision_detector(model: nn.Module, source: str | os.PathLike | dict[str, Tensor]) -> None:
    """Load a torchvision Faster/Mask R-CNN checkpoint (file or state dict) into our model, strictly."""
    sd = read_state_dict(source) if not isinstance(source, dict) else dict(source)
    converted = convert_torchvision_detection(sd)
    target = model.state_dict()
    missing = [k for k in target if k not in converted and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in converted if k not in target and not k.endswith("num_batches_tracked")]
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in converted.items()
                  if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if missing or unexpected or mismatched:
        raise WeightsError(f"torchvision checkpoint does not fit {type(model).__name__}: missing {missing[:6]}, "
                           f"unexpected {unexpected[:6]}, mismatched {mismatched[:6]}")
    model.load_state_dict({k: v for k, v in converted.items() if k in target}, strict=False)


def load_detector_weights(model: nn.Module, source: str | os.PathLike | dict[str, Tensor]) -> None:
    """Loads full-model weights: this project's ``.safetensors``/``.pth``, or a torchvision detection checkpoint.

    Args:
        model: a detector (or segmentation model) of this project.
        source: a file, or a state dict already read (e.g. with ``backbone.weights.read_state_dict``).

    torchvision checkpoints are recognised by their ``backbone.body.`` keys and converted with
    :func:`load_torchvision_detector`; our own files load strictly (``num_batches_tracked`` aside).

    Raises:
        WeightsError: The file cannot be read, or its keys or shapes do not fit the model (the message
            names the file and the first missing / unexpected / mis-shaped keys).
    """
    where = "the state dict" if isinstance(source, dict) else f"weights {str(source)!r}"
    sd = dict(source) if isinstance(source, dict) else read_state_dict(source)
    if any(k.startswith("backbone.body.") for k in sd):
        load_torchvision_detector(model, sd)
        return
    target = model.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in sd.items()
                  if k in target and tuple(v.shape) != tuple(target[k].shape)]
    if mismatched:
        raise WeightsError(f"{where} do not fit the model: mismatched shapes (file vs model) {mismatched[:6]}")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise WeightsError(f"{where} do not fit the model: missing {missing[:6]}, "
                           f"unexpected {result.unexpected_keys[:6]}")
