"""bf16 autocast on the CPU: finite fp32 losses that backpropagate, and fp32/int64 outputs."""

from __future__ import annotations

import math

import seghelpers as H
import torch


def train_and_eval_under_bf16(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    images, targets = H.toy_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    for k, v in losses.items():
        # The mask BCE and the semantic cross-entropy are taken in fp32 whatever autocast does.
        if k in ("loss_mask", "loss_sem_seg"):
            assert v.dtype == torch.float32, k
        assert math.isfinite(float(v.detach())), k
    sum(v.float() for v in losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return model(images)


def test_mask_rcnn_under_bf16_autocast():
    out = train_and_eval_under_bf16(H.tiny_mask_rcnn())
    for o in out:
        assert o["masks"].dtype == torch.float32
        assert torch.isfinite(o["masks"]).all() and float(o["masks"].max()) <= 1.0


def test_semantic_and_panoptic_fpn_under_bf16_autocast():
    for model in (H.tiny_semantic_fpn(), H.tiny_panoptic_fpn()):
        out = train_and_eval_under_bf16(model)
        images, _ = H.toy_batch()
        for img, o in zip(images, out):
            assert o["sem_seg"].dtype == torch.int64 and o["sem_seg"].shape == img.shape[-2:]
