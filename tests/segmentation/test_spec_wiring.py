"""Every field of `ModelSpec` reaches the models built from it.

The leaf fields are walked generically; each is perturbed to a valid non-default value and the built model
must differ (module types, parameter shapes and `requires_grad`, plain attributes of modules and of the
objects they hold such as matchers and box coders, small buffers such as the pixel mean) from the model of
the unperturbed spec, for every builder that uses the field's section. A field added to the schema and
wired to nothing fails here; the few that legitimately leave the module tree alone are listed in
`NOT_IN_THE_MODULES` with the test that covers them.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from backbone import save_safetensors
from backbone.weights import WeightsError
from detection.models import build_faster_rcnn
from detection.specs import ModelSpec
from segmentation import build_mask_rcnn, build_panoptic_fpn, build_semantic_fpn

# Fields that do not show in the module tree, and where they are tested instead.
NOT_IN_THE_MODULES = {
    "task": "selects the builder (the task registry); tests/segmentation/test_seg_tasks_eval.py",
    "weights": "weights loaded after building; test_weights_fields_load_their_files below",
    "backbone.weights": "trunk weights loaded while building; test_weights_fields_load_their_files below",
}

BASE = ModelSpec(task="panoptic_fpn", num_classes=3).replace(
    backbone_name="resnet18", backbone_width=8, backbone_norm="BN", freeze_at=0, fpn_channels=16, fc_dim=32,
    mask_conv_dim=16, mask_norm="none", semantic_conv_dims=16, min_size=(64,), max_size=96, test_min_size=64,
    test_max_size=96, rpn_pre_nms_topk=(200, 100), rpn_post_nms_topk=(100, 50))

# Values the generic rule (below) cannot pick, and fields that act only with another setting: `(base changes,
# value)`. Both specs of the comparison get the base changes, so the difference comes from the field alone.
SPECIAL: dict[str, tuple[dict[str, Any], Any]] = {
    "arch": ({"task": "detection"}, "c4"),
    "backbone.name": ({}, "resnet34"),
    "rpn.anchor_sizes": ({}, ((16.0,), (32.0,), (64.0,), (128.0,), (256.0,))),
    "roi.pooler_resolution": ({}, 5),
    "roi.fg_iou": ({}, 0.6),
    "roi.conv_dim": ({"box_head": "4conv1fc"}, 24),
    "roi.num_convs": ({"box_head": "4conv1fc"}, 2),
    "roi.box_head_norm": ({"box_head": "4conv1fc"}, "GN"),
    "semantic.common_stride": ({"semantic_in_features": ("p3", "p4", "p5")}, 8),
    "semantic.in_features": ({}, ("p3", "p4", "p5")),
}

Builder = Callable[[ModelSpec], nn.Module]
FASTER: Builder = build_faster_rcnn
MASK: Builder = build_mask_rcnn
SEMANTIC: Builder = build_semantic_fpn


def build_panoptic_fpn_with_masks(spec: ModelSpec) -> nn.Module:
    return build_panoptic_fpn(spec, with_masks=True)


PANOPTIC: Builder = build_panoptic_fpn_with_masks


# Which models read each section (top-level fields: by name).
USERS: dict[str, tuple[Builder, ...]] = {
    "backbone": (FASTER, MASK, SEMANTIC, PANOPTIC), "fpn": (FASTER, MASK, SEMANTIC, PANOPTIC),
    "input": (FASTER, MASK, SEMANTIC, PANOPTIC), "num_classes": (FASTER, MASK, SEMANTIC, PANOPTIC),
    "rpn": (FASTER, MASK, PANOPTIC), "roi": (FASTER, MASK, PANOPTIC), "box_loss": (FASTER, MASK, PANOPTIC),
    "torchvision_anchor_strides": (FASTER, MASK, PANOPTIC), "mask": (MASK, PANOPTIC),
    "semantic": (SEMANTIC, PANOPTIC), "arch": (FASTER,),
}


def leaf_fields() -> list[tuple[str, Any]]:
    """`(dotted name, annotation)` of every leaf field of ModelSpec, sections walked generically."""
    out = []
    for f in dataclasses.fields(ModelSpec):
        tp = typing.get_type_hints(ModelSpec)[f.name]
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            out += [(f"{f.name}.{g.name}", hints[g.name]) for g in dataclasses.fields(tp)]
        else:
            out.append((f.name, tp))
    return out


def perturbed(value: Any, tp: Any) -> Any:
    """A different valid value by type: the next Literal choice, `not`, `+1`, `x 0.8`, element-wise for tuples."""
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        return choices[(choices.index(value) + 1) % len(choices)]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.8
    if isinstance(value, tuple) and value and all(isinstance(v, int | float) for v in value):
        return tuple(perturbed(v, type(v)) for v in value)
    raise AssertionError(f"no generic perturbation for {value!r} ({tp}): add the field to SPECIAL")


def fingerprint(model: nn.Module) -> list:
    """What distinguishes two built models apart from their random weights."""

    def plain(v: Any, depth: int = 0) -> Any:
        if isinstance(v, int | float | str | bool | type(None)):
            return v
        if isinstance(v, tuple | list):
            return tuple(plain(x, depth) for x in v)
        if isinstance(v, nn.Module | torch.Tensor | dict) or callable(v) or depth > 0 or not hasattr(v, "__dict__"):
            return "<skip>"
        return tuple(sorted((k, plain(x, 1)) for k, x in vars(v).items()))  # Matcher, BoxCoder, ...

    rows = []
    for name, m in model.named_modules():
        attrs = tuple((k, plain(v)) for k, v in sorted(vars(m).items()) if not k.startswith("_")
                      and k not in ("spec", "training"))
        params = tuple((k, tuple(p.shape), p.requires_grad) for k, p in m.named_parameters(recurse=False))
        buffers = tuple((k, tuple(b.shape), tuple(b.flatten().tolist()) if b.numel() <= 16 else None)
                        for k, b in m.named_buffers(recurse=False))
        rows.append((name, type(m).__name__, attrs, params, buffers))
    return rows


def _cases() -> list[tuple[str, Any]]:
    return [(name, tp) for name, tp in leaf_fields() if name not in NOT_IN_THE_MODULES]


def test_the_exemptions_are_fields() -> None:
    names = {name for name, _ in leaf_fields()}
    assert set(NOT_IN_THE_MODULES) <= names and set(SPECIAL) <= names


@pytest.mark.parametrize(("name", "tp"), _cases(), ids=[name for name, _ in _cases()])
def test_every_field_changes_the_built_model(name: str, tp: Any) -> None:
    section = name.split(".")[0]
    flat = name.replace(".", "_")
    base_changes, value = SPECIAL.get(name, ({}, None))
    base = BASE.replace(**base_changes)
    current = getattr(getattr(base, section), name.split(".")[1]) if "." in name else getattr(base, name)
    if name not in SPECIAL:
        value = perturbed(current, tp)
    assert value != current
    changed = base.replace(**{flat: value})
    builders = USERS.get(section) or USERS[name]
    for build in builders:
        a, b = fingerprint(build(base)), fingerprint(build(changed))
        assert a != b, f"{name}={value!r} does not reach the model of {build.__name__}"


def test_c4_is_for_faster_rcnn_only() -> None:
    spec = BASE.replace(arch="c4")
    for build in (MASK, SEMANTIC, PANOPTIC):
        with pytest.raises(ValueError, match=r"arch='c4'.*FPN; use arch='fpn'"):
            build(spec)


# ------------------------------------------------------------------------------------ the weights
def test_weights_fields_load_their_files(tmp_path: Path) -> None:
    """`weights` (the whole model, loaded after building) and `backbone.weights` (the trunk, loaded while
    building) change the parameters, not the modules: load files written from other seeds."""
    torch.manual_seed(1)
    source = build_mask_rcnn(BASE)
    full = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(full))
    trunk = tmp_path / "trunk.safetensors"
    save_safetensors(source.backbone.bottom_up, trunk)

    torch.manual_seed(0)
    plain = build_mask_rcnn(BASE)
    torch.manual_seed(0)
    loaded = build_mask_rcnn(BASE.replace(weights=str(full)))
    torch.manual_seed(0)
    with_trunk = build_mask_rcnn(BASE.replace(backbone_weights=str(trunk)))
    assert fingerprint(plain) == fingerprint(loaded) == fingerprint(with_trunk)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
        if k.startswith("backbone.bottom_up."):
            assert torch.equal(with_trunk.state_dict()[k], v), k
            assert not torch.equal(plain.state_dict()[k], v) or v.dim() <= 1, k
        elif k.startswith("roi_heads.mask_head."):
            assert torch.equal(with_trunk.state_dict()[k], plain.state_dict()[k]), k  # only the trunk loads

    with pytest.raises(WeightsError, match=r"model\.safetensors.*do not fit the model"):
        build_mask_rcnn(BASE.replace(weights=str(full), fpn_channels=24))
