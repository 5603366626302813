"""The segmentation losses against independent computations: Mask R-CNN's ``loss_mask`` against torchvision's
``maskrcnn_loss`` on the same positive RoIs, mask logits and ground truth; the semantic FPN loss against a
cross-entropy written out from its definition, on targets resized by index arithmetic."""

from __future__ import annotations

import math

import seghelpers as H
import torch
from torchvision.models.detection.roi_heads import maskrcnn_loss

from segmentation.models import MaskRCNN


def _blob_target(h: int, w: int) -> dict[str, torch.Tensor]:
    """Three objects whose masks are not their boxes (a ring, a triangle, an L), so that the crop matters."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ring = ((yy - 22) ** 2 + (xx - 26) ** 2 <= 18 ** 2) & ((yy - 22) ** 2 + (xx - 26) ** 2 >= 8 ** 2)
    triangle = (yy >= 30) & (yy < 62) & (xx >= 50) & (xx - 50 <= yy - 30)
    ell = ((yy >= 34) & (yy < 60) & (xx >= 4) & (xx < 14)) | ((yy >= 50) & (yy < 60) & (xx >= 4) & (xx < 40))
    masks = torch.stack([ring, triangle, ell]).to(torch.uint8)
    boxes = []
    for m in masks.bool():
        ys, xs = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
    return {"boxes": torch.tensor(boxes), "labels": torch.tensor([1, 3, 2]), "masks": masks}


def test_mask_loss_equals_torchvisions_maskrcnn_loss() -> None:
    """Our ``loss_mask`` of a training forward, and torchvision's ``maskrcnn_loss`` given the same mask logits,
    the same positive RoIs (with their matched ground-truth indices) and the same masks and labels.

    The images are at the model's size (64 x 96: not resized), so boxes and masks share one frame in both
    libraries. One convention differs and is passed explicitly: our targets are RoIAlign crops with
    ``aligned=True`` (Detectron2's: pixel k covers [k, k + 1)), torchvision's ``project_masks_on_boxes`` uses
    ``aligned=False``, which reads a box half a pixel further; torchvision is given the boxes shifted by -0.5
    px, the same sampling points. The rest is torchvision's own: the matched masks and labels, the class
    channel, the crop, the BCE and its mean over every RoI and pixel.
    """
    torch.manual_seed(0)
    model: MaskRCNN = H.tiny_mask_rcnn().train()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 64, 96, generator=g)]
    targets = [_blob_target(64, 96), _blob_target(64, 96)]
    targets[1] = {k: v[:2] for k, v in targets[1].items()}  # another count of objects in the second image
    heads = model.roi_heads
    seen: dict[str, object] = {}
    real_sample, real_logits = heads.sample, heads.mask_logits

    def sample(*args, **kwargs):
        seen["sampled"] = out = real_sample(*args, **kwargs)
        return out

    def mask_logits(features, boxes, image_index):
        # Plus random logits of both signs: an untrained head predicts ~0 everywhere, where the BCE is log(2)
        # whatever the target; these make the loss depend on every target pixel.
        out = real_logits(features, boxes, image_index)
        seen["logits"] = out = out + 3.0 * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        return out

    heads.sample, heads.mask_logits = sample, mask_logits
    ours = model(images, targets)["loss_mask"]

    sampled, logits = seen["sampled"], seen["logits"]
    s = sampled["fg"].shape[1]
    positive = sampled["fg"].flatten().nonzero().squeeze(1)
    image_index = positive // s
    assert len(positive) == logits.shape[0] >= 10 and set(image_index.tolist()) == {0, 1}
    boxes = sampled["boxes"].reshape(-1, 4)[positive]
    starts = [0, len(targets[0]["labels"])]
    matched = sampled["matched"].flatten()[positive]
    proposals = [boxes[image_index == i] - 0.5 for i in range(2)]
    matched_idxs = [matched[image_index == i] - starts[i] for i in range(2)]
    assert all(len(m) and int(m.min()) >= 0 for m in matched_idxs)
    assert set(torch.cat(matched_idxs).tolist()) == {0, 1, 2}  # RoIs of every object
    reference = maskrcnn_loss(logits, proposals, [t["masks"] for t in targets], [t["labels"] for t in targets],
                              matched_idxs)
    assert abs(float(reference.detach()) - math.log(2)) > 0.05  # the targets matter (not the log(2) of zero logits)
    # Measured: 0.0 difference (loss 1.39); 1e-6 relative allows another BCE kernel's summation order.
    # measured: 0 (the same ops in the same order here); rtol 1e-6 for float32 reduction order
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
    # Control: without the half-pixel shift the crops differ (the convention matters and was exercised).
    unshifted = maskrcnn_loss(logits, [p + 0.5 for p in proposals], [t["masks"] for t in targets],
                              [t["labels"] for t in targets], matched_idxs)
    assert abs(float(unshifted.detach()) - float(reference.detach())) > 1e-3 * float(reference.detach())


def _nearest_resize(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize by index arithmetic: output pixel (y, x) reads input (floor(y * H / h),
    floor(x * W / w)) (PyTorch's "nearest" rule, written out)."""
    h, w = labels.shape
    ys = (torch.arange(size[0]) * h // size[0]).clamp(max=h - 1)
    xs = (torch.arange(size[1]) * w // size[1]).clamp(max=w - 1)
    return labels[ys][:, xs]


def test_semantic_fpn_loss_equals_a_direct_cross_entropy() -> None:
    """``loss_sem_seg`` of a training forward against the definition: the head's logits (captured), the label
    maps resized to each image's resized size and padded with the ignore value, then
    ``mean over labelled pixels of (logsumexp(logits) - logits[label])``, written out in float64."""
    torch.manual_seed(0)
    model = H.tiny_semantic_fpn().train()
    images, targets = H.toy_batch()  # 72x96 and 100x80: resized by the model, padded into one batch
    targets[0]["sem_seg"][:10, :10] = 255  # some ignored pixels of the dataset's own
    seen: dict[str, torch.Tensor] = {}
    model.semantic_head.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o))
    loss = model(images, targets)["loss_sem_seg"]
    logits = seen["logits"].double()
    b, _, hb, wb = logits.shape
    total, count = 0.0, 0
    for i, (img, t) in enumerate(zip(images, targets)):
        h, w = img.shape[-2:]
        scale = min(64 / min(h, w), 96 / max(h, w))  # the tiny spec's min_size / max_size
        size = (math.floor(h * scale + 0.5), math.floor(w * scale + 0.5))
        resized = _nearest_resize(t["sem_seg"], size)
        full = torch.full((hb, wb), 255, dtype=torch.int64)
        full[: size[0], : size[1]] = resized
        keep = full != 255
        x = logits[i].permute(1, 2, 0)[keep]  # (pixels, classes)
        picked = x.gather(1, full[keep][:, None]).squeeze(1)
        total += float((torch.logsumexp(x, dim=1) - picked).sum())
        count += int(keep.sum())
    assert 0 < count < b * hb * wb  # padding and the ignored corner are left out
    expected = total / count * model.loss_weight
    # Measured: 1.1e-7 relative (float32 cross-entropy against this float64 sum).
    assert abs(float(loss.detach()) - expected) <= 1e-6 * expected, (float(loss.detach()), expected)
