"""The task registry's model builder for "detection": `build_model(model_section, num_foreground_classes)`.

`model_section` is the config's `model` section, which is a `detection.specs.ModelSpec` itself: there is
no translation step, the builders read the spec.
"""

from __future__ import annotations

from .faster_rcnn import FasterRCNN
from .models import build_faster_rcnn
from .specs import ModelSpec

__all__ = ["build_detector"]


def build_detector(spec: ModelSpec, num_classes: int) -> FasterRCNN:
    """The Faster R-CNN of `spec` for `num_classes` foreground classes (task "detection")."""
    return build_faster_rcnn(spec.replace(num_classes=num_classes))
