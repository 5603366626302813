"""Gradient (activation) checkpointing of the backbone stages (model.backbone.checkpoint) on the tiny real
detector: a training step gives the losses and gradients of the run without it, with the default frozen
stages and FrozenBN, in channels_last, under bf16 autocast and through torch.compile; a per-stage list
checkpoints exactly those stages; inference is untouched; bad settings are clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_detection import TINY, tiny_detector, tiny_images

from detection import ModelSpec
from detection.models import build_faster_rcnn
from resnet_det.config import Config, config_from_dict
from resnet_det.engine.launch import build_model
from resnet_det_common import autocast

IMAGES, TARGETS = tiny_images(2, seed=5)


def _step(model, *, channels_last=False, amp="off"):
    """Losses and gradients of one training step (the sampling RNG reseeded: both runs draw the same)."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    torch.manual_seed(123)
    with autocast(torch.device("cpu"), amp):
        losses = model(IMAGES, TARGETS)
    sum(v.float() for v in losses.values()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def _trunk(model):
    return model.backbone.bottom_up


CASES = {
    "fp32": {},
    "channels_last": {"channels_last": True},
    "bf16 autocast": {"amp": "bf16"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_stages_give_the_same_losses_and_gradients(case):
    plain = tiny_detector()
    ref_losses, ref_grads = _step(plain, **CASES[case])
    ckpt = tiny_detector()
    _trunk(ckpt).set_grad_checkpointing(True)
    assert _trunk(ckpt).grad_checkpointing == ("res2", "res3", "res4", "res5")
    losses, grads = _step(ckpt, **CASES[case])
    assert set(grads) == set(ref_grads) and not any(k.startswith("backbone.bottom_up.res2") for k in grads), \
        "res2 is frozen (freeze_at=2): no gradient, and checkpointing it is harmless"
    assert any(k.startswith("backbone.bottom_up.res3") for k in grads)
    for k, v in ref_losses.items():
        assert torch.equal(losses[k], v), k
    # The recomputation repeats the same kernels on the same inputs: measured difference 0 (fp32,
    # channels_last and bf16 on this CPU), so the comparison is exact.
    for k, g in ref_grads.items():
        assert torch.equal(grads[k], g), k


@pytest.mark.slow
def test_checkpointing_through_torch_compile_gives_the_eager_gradients():
    ref_losses, ref_grads = _step(tiny_detector())
    model = tiny_detector()
    _trunk(model).set_grad_checkpointing(True)
    model.backbone = torch.compile(model.backbone, backend="aot_eager")  # what train.compile does
    losses, grads = _step(model)
    names = {k.replace("._orig_mod", ""): g for k, g in grads.items()}
    assert set(names) == set(ref_grads)
    worst = max([(losses[k] - v).abs().item() for k, v in ref_losses.items()]
                + [(names[k] - g).abs().max().item() for k, g in ref_grads.items()])
    print(f"compiled + checkpointed vs eager: max |difference| {worst:.2e}")  # the record (-s)
    # aot_eager re-traces the stages (and the recomputation) with the same kernels: measured difference 0.
    assert worst == 0.0


def test_a_stage_list_checkpoints_exactly_those_stages_and_inference_is_untouched():
    model = tiny_detector(freeze_at=0)
    trunk = _trunk(model)
    trunk.set_grad_checkpointing(["res3", "res5"])
    calls = {name: 0 for name in trunk.stage_names}
    for name in trunk.stage_names:
        getattr(trunk, name).register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1))
    _step(model)
    assert calls == {"res2": 1, "res3": 2, "res4": 1, "res5": 2}, "a checkpointed stage runs again in backward"
    calls.update(dict.fromkeys(calls, 0))
    model.eval()
    with torch.no_grad():
        model(IMAGES)
    assert set(calls.values()) == {1}
    trunk.set_grad_checkpointing(False)
    assert trunk.grad_checkpointing == ()


def test_the_config_key_reaches_the_trunk_and_bad_values_are_clear_errors():
    assert Config().model.backbone.checkpoint is False
    cfg = config_from_dict({"model": {"backbone": {"checkpoint": ["res4"]}}})
    assert cfg.model.backbone.checkpoint == ("res4",)

    # The builder applies it (the engine's build_model and a direct build_faster_rcnn alike).
    class _Task:
        def build_model(self, spec):
            return build_faster_rcnn(spec)

    spec = ModelSpec(**{}).replace(**{k: v for k, v in TINY.items()})
    for setting, expected in ((True, ("res2", "res3", "res4", "res5")), (("res4",), ("res4",)), (False, ())):
        spec_b = dataclasses.replace(spec, backbone=dataclasses.replace(spec.backbone, checkpoint=setting))
        model = build_model(dataclasses.replace(Config(), model=spec_b), _Task())
        assert _trunk(model).grad_checkpointing == expected
        assert _trunk(tiny_detector(backbone_checkpoint=setting)).grad_checkpointing == expected
    with pytest.raises(ValueError, match=r"model\.backbone\.checkpoint: .*'res6'.*stages: res2, res3, res4, res5"):
        tiny_detector(backbone_checkpoint=("res6",))
    with pytest.raises(ValueError, match="no ResNet stages to checkpoint"):
        tiny_detector(backbone_name="vgg16", backbone_checkpoint=True)
