"""Shared by the torchvision parity tests (detection and segmentation): random-weight torchvision models
made non-degenerate, real images, and detections compared as sets."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from PIL import Image


def _random_bn_statistics(m: torch.nn.Module, g: torch.Generator) -> None:
    n = m.num_features
    m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
    m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
    m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)


def perturb_frozen_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Random statistics in every FrozenBatchNorm2d of our model, so that folding BN has something to fold."""
    from backbone import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                _random_bn_statistics(m, g)


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random BN statistics and biases, so that every parameter's mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                _random_bn_statistics(m, g)
            elif isinstance(m, torch.nn.Conv2d | torch.nn.Linear | torch.nn.ConvTranspose2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)


def per_group_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, thr: float) -> set[int]:
    """Indices kept by torchvision's plain greedy NMS run on each group separately (the reference)."""
    from torchvision.ops import nms

    keep: set[int] = set()
    for g in groups.unique().tolist():
        idx = (groups == g).nonzero().squeeze(1)
        keep |= set(idx[nms(boxes[idx], scores[idx], thr)].tolist())
    return keep


def without_common_component(w: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """`w` (rows) with their projection on the direction `mu` removed.

    Random head features share a large common component, so a random classifier picks the same class
    everywhere; classifier rows orthogonal to the mean feature give varied classes and spread scores.
    """
    return w - (w @ mu)[:, None] * mu[None] / (mu @ mu)


def freeze_bn_like_torchvision_checkpoints(model: torch.nn.Module) -> None:
    """torchvision builds random-weight models with BatchNorm2d but its v1 COCO checkpoints run the
    backbone with FrozenBatchNorm2d: use the latter, as users of the checkpoint do (the two round
    differently)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for m in list(model.backbone.body.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, torch.nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                frozen.load_state_dict({k: v for k, v in child.state_dict().items() if k != "num_batches_tracked"})
                setattr(m, child_name, frozen)


def load_images(folder: Path) -> list[torch.Tensor]:
    """The tiny-COCO JPEGs as float `[3, H, W]` tensors in [0, 1], in file-name order."""
    files = sorted((folder / "images").glob("*.jpg"))
    return [torchvision.transforms.functional.to_tensor(Image.open(f).convert("RGB")) for f in files]


def match_detections(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: str) -> list[tuple[int, int]]:
    """Pairs (reference index, our index) of the same detection (same label, score within 1e-4, box
    within 0.01 px); fails unless the two sets are equal (equal scores may come in another order)."""
    assert len(ref["boxes"]) == len(got["boxes"]), f"{where}: {len(ref['boxes'])} vs {len(got['boxes'])} detections"
    unused = torch.ones(len(got["boxes"]), dtype=torch.bool)
    pairs = []
    for r, (box, score, label) in enumerate(zip(ref["boxes"], ref["scores"], ref["labels"])):
        close = ((got["scores"] - score).abs() <= 1e-4) & (got["labels"] == label) & unused
        close &= (got["boxes"] - box).abs().max(dim=1).values <= 0.01
        idx = close.nonzero()
        assert len(idx), f"{where}: no match for label {int(label)} score {float(score):.5f} box {box.tolist()}"
        unused[idx[0, 0]] = False
        pairs.append((r, int(idx[0, 0])))
    return pairs
