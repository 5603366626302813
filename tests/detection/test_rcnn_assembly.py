"""One R-CNN assembly (`detection.models.build_rcnn`) and one forward (`FasterRCNN.forward`) for Faster, Mask and
Panoptic R-CNN; extra heads are arguments, and a new image head plugs in without a new model class."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from detection import FasterRCNN, ModelSpec, build_faster_rcnn
from detection.faster_rcnn import ImageHead
from detection.models import build_rcnn
from segmentation import MaskRCNN, PanopticFPN, SemanticFPN, build_mask_rcnn, build_panoptic_fpn, build_semantic_fpn

TINY = {"num_classes": 3, "backbone_width": 8, "input_min_size": (64,), "input_max_size": 64,
        "input_test_min_size": 64, "input_test_max_size": 64}


class MeanIntensityHead(nn.Module):
    """A toy image head: predicts each image's mean P2 activation, trained towards `targets[i]["brightness"]`."""

    def __init__(self, feature: str = "p2") -> None:
        super().__init__()
        self.feature = feature
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return features[self.feature].mean(dim=(1, 2, 3)) * self.scale

    def check_targets(self, targets: Sequence[dict[str, Tensor]], original_sizes: Sequence[tuple[int, int]]) -> None:
        for i, t in enumerate(targets):
            if "brightness" not in t:
                raise ValueError(f"targets[{i}] has no 'brightness'")

    def losses(self, out: Tensor, targets: Sequence[dict[str, Tensor]], sizes: Sequence[tuple[int, int]],
               original_sizes: Sequence[tuple[int, int]], batch_size: tuple[int, int]) -> dict[str, Tensor]:
        goal = torch.stack([t["brightness"].float() for t in targets])
        return {"loss_brightness": ((out - goal) ** 2).mean()}

    def predict(self, out: Tensor, sizes: Sequence[tuple[int, int]], original_sizes: Sequence[tuple[int, int]]
                ) -> list[dict[str, Tensor]]:
        return [{"brightness": v} for v in out]


def _targets(n: int) -> list[dict[str, Tensor]]:
    return [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1]),
             "brightness": torch.tensor(0.5)} for _ in range(n)]


def test_mask_and_panoptic_models_have_no_forward_of_their_own():
    for cls in (MaskRCNN, PanopticFPN):
        assert "forward" not in vars(cls), f"{cls.__name__} repeats the R-CNN forward"
    assert PanopticFPN.forward is FasterRCNN.forward


@pytest.mark.parametrize("build", [build_faster_rcnn, build_mask_rcnn, build_panoptic_fpn, build_semantic_fpn])
def test_every_model_carries_the_spec_it_was_built_from(build):
    model = build(ModelSpec(), **TINY)
    assert isinstance(model.spec, ModelSpec)
    assert model.spec == ModelSpec().replace(**TINY)


def test_a_new_image_head_plugs_into_the_one_assembly_without_a_model_class():
    torch.manual_seed(0)
    spec = ModelSpec().replace(**TINY)
    model = build_rcnn(spec, image_heads=lambda s, shapes: {"brightness_head": MeanIntensityHead()})
    assert type(model) is FasterRCNN and model.image_head_names == ("brightness_head",)
    assert isinstance(model.brightness_head, ImageHead)
    assert any(k.startswith("brightness_head.") for k in model.state_dict())
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    model.train()
    losses = model(images, _targets(2))
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_brightness"} <= set(losses)
    losses["loss_brightness"].backward()
    assert model.brightness_head.scale.grad is not None and model.brightness_head.scale.grad.abs() > 0
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert [set(o) for o in out] == [{"boxes", "scores", "labels", "brightness"}] * 2


def test_an_image_head_checks_its_targets_before_any_computation():
    model = build_rcnn(ModelSpec().replace(**TINY), image_heads=lambda s, shapes: {"b": MeanIntensityHead()}).train()
    targets = _targets(1)
    del targets[0]["brightness"]
    with pytest.raises(ValueError, match=r"targets\[0\] has no 'brightness'"):
        model([torch.rand(3, 64, 64)], targets)


def test_image_heads_must_meet_the_protocol_and_not_shadow_the_model():
    parts = build_faster_rcnn(**TINY)
    args = (parts.backbone, parts.rpn, parts.roi_heads, parts.preprocessor)
    with pytest.raises(TypeError, match="check_targets / losses / predict"):
        FasterRCNN(*args, image_heads={"x": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="taken by the model"):
        FasterRCNN(*args, image_heads={"rpn": MeanIntensityHead()})


def test_panoptic_fpn_is_the_assembly_with_the_semantic_head_as_an_image_head():
    torch.manual_seed(0)
    model = build_panoptic_fpn(**TINY, with_masks=True)
    assert model.image_head_names == ("semantic_head",)
    assert model.semantic_loss_weight == model.spec.semantic.loss_weight
    images = [torch.rand(3, 64, 64)]
    targets = _targets(1)
    targets[0]["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
    targets[0]["masks"][0, 4:40, 4:40] = 1
    targets[0]["sem_seg"] = torch.zeros(64, 64, dtype=torch.int64)
    losses = model.train()(images, targets)
    assert {"loss_mask", "loss_sem_seg"} <= set(losses)
    # the semantic loss is the head's own, weighted: recompute it from the head's methods
    model.semantic_loss_weight = 1.0
    torch.manual_seed(1)
    unweighted = model(images, targets)["loss_sem_seg"]
    model.semantic_loss_weight = 0.25
    torch.manual_seed(1)
    weighted = model(images, targets)["loss_sem_seg"]
    torch.testing.assert_close(weighted, unweighted * 0.25, rtol=0, atol=0)  # exact: one multiplication


def test_c4_refuses_extra_heads_with_the_fix():
    spec = ModelSpec().replace(**TINY, arch="c4")
    with pytest.raises(ValueError, match="arch='fpn'"):
        build_rcnn(spec, image_heads=lambda s, shapes: {"b": MeanIntensityHead()})


def test_semantic_fpn_runs_the_heads_own_methods():
    model = build_semantic_fpn(**TINY)
    assert isinstance(model, SemanticFPN)
    assert model.loss_weight == model.semantic_head.loss_weight == model.spec.semantic.loss_weight
