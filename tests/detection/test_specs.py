"""The model schema: `ModelSpec.replace`'s naming rule, validation messages, torchvision's class convention."""

from __future__ import annotations

import dataclasses

import pytest

from detection.models import build_faster_rcnn, torchvision_spec
from detection.specs import BackboneSpec, MaskSpec, ModelSpec, ROISpec, RPNSpec


# ------------------------------------------------------------------------------------------ replace
def test_replace_a_whole_section_and_top_level_fields() -> None:
    rpn = RPNSpec(nms_thresh=0.6, conv_depth=2)
    spec = ModelSpec().replace(rpn=rpn, num_classes=3, arch="c4")
    assert spec.rpn == rpn and spec.num_classes == 3 and spec.arch == "c4"
    assert spec.roi == ROISpec()  # untouched sections keep their values


def test_replace_unique_field_names_reach_their_section() -> None:
    spec = ModelSpec().replace(test_min_size=320, score_thresh=0.3, detections_per_img=7, fc_dim=64, freeze_at=0,
                               min_size=(128,), max_size=192)
    assert (spec.input.test_min_size, spec.input.min_size, spec.input.max_size) == (320, (128,), 192)
    assert (spec.roi.score_thresh, spec.roi.detections_per_img, spec.roi.fc_dim) == (0.3, 7, 64)
    assert spec.backbone.freeze_at == 0


def test_replace_section_prefixed_names() -> None:
    spec = ModelSpec().replace(rpn_post_nms_topk=(2000, 300), roi_batch_size_per_image=64, backbone_name="resnet18",
                               fpn_channels=32, mask_norm="GN", rpn_nms_thresh=0.6, roi_nms_thresh=0.4,
                               backbone_norm="GN", semantic_loss_weight=0.5, box_head_norm="GN")
    assert spec.rpn.post_nms_topk == (2000, 300) and spec.roi.batch_size_per_image == 64
    assert (spec.backbone.name, spec.backbone.norm, spec.fpn.channels) == ("resnet18", "GN", 32)
    assert (spec.mask.norm, spec.semantic.loss_weight, spec.roi.box_head_norm) == ("GN", 0.5, "GN")
    assert (spec.rpn.nms_thresh, spec.roi.nms_thresh) == (0.6, 0.4)
    assert spec.fpn.norm == "none" and spec.semantic.norm == "GN"  # other sections' `norm` untouched


def test_replace_a_section_and_one_of_its_fields_together() -> None:
    spec = ModelSpec().replace(mask=MaskSpec(conv_dim=16), mask_norm="BN")
    assert spec.mask == MaskSpec(conv_dim=16, norm="BN")


def test_top_level_name_wins_over_a_section_field_of_the_same_name() -> None:
    spec = ModelSpec().replace(weights="model.safetensors", backbone_weights="imagenet")
    assert spec.weights == "model.safetensors" and spec.backbone.weights == "imagenet"


@pytest.mark.parametrize(("name", "sections"), [("nms_thresh", "rpn, roi"), ("norm", "backbone, fpn, mask, semantic"),
                                                ("pooler_resolution", "roi, mask"), ("fg_iou", "rpn, roi")])
def test_ambiguous_names_list_the_prefixed_spellings(name: str, sections: str) -> None:
    with pytest.raises(ValueError, match=rf"'{name}' is ambiguous.*{sections}") as err:
        ModelSpec().replace(**{name: 1})
    for section in sections.split(", "):
        assert f"{section}_{name}" in str(err.value)


def test_unknown_name_suggests_and_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown setting 'fc_dm'.*Did you mean 'fc_dim'.*Valid: .*roi_fc_dim"):
        ModelSpec().replace(fc_dm=3)
    with pytest.raises(ValueError, match="unknown setting 'backbone_kwargs'"):
        ModelSpec().replace(backbone_kwargs={"width": 8})
    with pytest.raises(ValueError, match="unknown setting 'rpn_box_head'"):  # a real field, of another section
        ModelSpec().replace(rpn_box_head="2fc")


def test_a_section_must_be_given_as_its_spec_class() -> None:
    with pytest.raises(TypeError, match=r"backbone='resnet18'.*BackboneSpec.*backbone_<field>"):
        ModelSpec().replace(backbone="resnet18")


def test_valid_names_follow_the_fields() -> None:
    """The rule is generic: every field of every section has its prefixed spelling, unique names their bare one."""
    names = set(ModelSpec().valid_names())
    for f in dataclasses.fields(ModelSpec):
        assert f.name in names
        section = getattr(ModelSpec(), f.name)
        if dataclasses.is_dataclass(section):
            assert {f"{f.name}_{g.name}" for g in dataclasses.fields(section)} <= names
    assert {"test_min_size", "fc_dim", "detections_per_img"} <= names
    assert not {"nms_thresh", "norm", "batch_size_per_image"} & names


def test_section_replace_is_the_same_rule() -> None:
    assert BackboneSpec().replace(width=8).width == 8
    with pytest.raises(ValueError, match=r"BackboneSpec\.replace: unknown setting 'widht'.*Did you mean 'width'"):
        BackboneSpec().replace(widht=8)


# ------------------------------------------------------------------------------------------ checks
@pytest.mark.parametrize(("kwargs", "key"), [
    ({"rpn_nms_thresh": 1.5}, "model.rpn.nms_thresh"),
    ({"rpn_positive_fraction": 0.0}, "model.rpn.positive_fraction"),
    ({"roi_fg_iou": 0.3, "roi_bg_iou": 0.4}, "model.roi.bg_iou/fg_iou"),
    ({"bbox_reg_weights": (1.0, 1.0)}, "model.roi.bbox_reg_weights"),
    ({"rpn_pre_nms_topk": (0, 10)}, "model.rpn.pre_nms_topk"),
    ({"freeze_at": 7}, "model.backbone.freeze_at"),
    ({"fpn_channels": 0}, "model.fpn.channels"),
    ({"min_size": ()}, "model.input.min_size"),
    ({"semantic_common_stride": 6}, "model.semantic.common_stride"),
    ({"num_classes": 0}, "model.num_classes"),
])
def test_out_of_range_values_name_the_dotted_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"config key '{key}' = .* is invalid: "):
        ModelSpec().replace(**kwargs)


def test_builders_need_num_classes() -> None:
    with pytest.raises(ValueError, match=r"model\.num_classes is None.*foreground classes.*num_classes=80"):
        build_faster_rcnn(backbone_name="resnet18", backbone_width=8)


# ------------------------------------------------------------------------------------- torchvision
def test_torchvision_spec_counts_the_background_and_the_spec_does_not() -> None:
    spec = torchvision_spec("fasterrcnn_resnet50_fpn", num_classes=5)
    assert spec.num_classes == 4
    model = build_faster_rcnn(spec.replace(backbone_name="resnet18", backbone_width=8, fpn_channels=16, fc_dim=32))
    assert model.num_classes == 5 and model.roi_heads.predictor.cls_score.out_features == 5
    assert model.spec is not None and model.spec.num_classes == 4
    with pytest.raises(ValueError, match=r"num_classes=1 counts the background"):
        torchvision_spec("fasterrcnn_resnet50_fpn", num_classes=1)
    with pytest.raises(ValueError, match="unknown torchvision architecture 'fasterrcnn_resnet101_fpn'"):
        torchvision_spec("fasterrcnn_resnet101_fpn")


def test_torchvision_v2_spec_differs_where_torchvision_does() -> None:
    v1, v2 = torchvision_spec("fasterrcnn_resnet50_fpn"), torchvision_spec("fasterrcnn_resnet50_fpn_v2")
    assert (v1.backbone.norm, v1.fpn.norm, v1.rpn.conv_depth, v1.roi.box_head) == ("FrozenBN", "none", 1, "2fc")
    assert (v2.backbone.norm, v2.fpn.norm, v2.rpn.conv_depth, v2.roi.box_head) == ("BN", "BN", 2, "4conv1fc")
    assert v1.torchvision_anchor_strides and v1.backbone.freeze_at == 0
