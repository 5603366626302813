"""The detector's parts, one by one, against torchvision's own implementations where they exist
(anchors, box coding, matching, multi-scale RoIAlign, the RPN head's output layout), plus the
properties of the parts torchvision does not have in this form (batched matching, the fixed-size
balanced sampler)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign, box_iou, roi_align

from detection.anchors import AnchorGenerator
from detection.boxes import BBOX_XFORM_CLIP, BoxCoder, pairwise_iou
from detection.matcher import Matcher, sample_balanced
from detection.poolers import RoIPooler
from detection.roi_heads import FastRCNNPredictor, RoIHeads, TwoMLPHead
from detection.rpn import RPN, RPNHead
from detection.structures import GroundTruth

pytestmark = pytest.mark.usefixtures("single_thread")

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = (0.5, 1.0, 2.0)
FPN_STRIDES = (4, 8, 16, 32, 64)


def random_boxes(n: int, g: torch.Generator, *, max_xy: float = 200.0, min_wh: float = 4.0,
                 max_wh: float = 120.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * max_xy
    wh = min_wh + torch.rand(n, 2, generator=g) * (max_wh - min_wh)
    return torch.cat([xy, xy + wh], dim=1)


def jitter(boxes: torch.Tensor, g: torch.Generator, scale: float) -> torch.Tensor:
    """Boxes near `boxes`: corners moved by up to `scale` times the box size (IoUs spread over 0..1)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    moved = boxes + (torch.rand(boxes.shape, generator=g) * 2 - 1) * scale * wh
    x1, y1 = torch.minimum(moved[:, 0], moved[:, 2]), torch.minimum(moved[:, 1], moved[:, 3])
    x2, y2 = torch.maximum(moved[:, 0], moved[:, 2]) + 1, torch.maximum(moved[:, 1], moved[:, 3]) + 1
    return torch.stack([x1, y1, x2, y2], dim=1)


def fpn_grid(h: int, w: int) -> list[tuple[int, int]]:
    """Feature sizes of P2..P6 for a padded (h, w) batch: P2..P5 by ceil division, P6 = maxpool(k1, s2) of P5."""
    grids = [(math.ceil(h / s), math.ceil(w / s)) for s in FPN_STRIDES[:4]]
    p5 = grids[-1]
    return [*grids, ((p5[0] - 1) // 2 + 1, (p5[1] - 1) // 2 + 1)]


def torchvision_anchors(h: int, w: int, grids: list[tuple[int, int]]) -> torch.Tensor:
    tv = TVAnchorGenerator(FPN_SIZES, (RATIOS,) * len(FPN_SIZES))
    images = ImageList(torch.zeros(2, 3, h, w), [(h, w), (h - 10, w - 20)])
    feats = [torch.zeros(2, 1, gh, gw) for gh, gw in grids]
    out = tv(images, feats)
    assert torch.equal(out[0], out[1])  # torchvision gives every image the same anchors
    return out[0]


# ---------------------------------------------------------------------------------------------- anchors
def test_anchors_equal_torchvision_for_fpn_sizes_on_padded_image() -> None:
    h, w = 256, 320  # a multiple of 64: declared strides and torchvision's derived strides agree on every level
    grids = fpn_grid(h, w)
    expected = torchvision_anchors(h, w, grids)
    for tv_strides in (False, True):
        ours = AnchorGenerator(FPN_SIZES, RATIOS, FPN_STRIDES, torchvision_strides=tv_strides)
        per_level = ours(grids, torch.device("cpu"), image_size=(h, w))
        assert [a.shape[0] for a in per_level] == [gh * gw * 3 for gh, gw in grids]
        assert torch.equal(torch.cat(per_level), expected), f"torchvision_strides={tv_strides}"
    assert expected.shape[0] == sum(gh * gw * 3 for gh, gw in grids)


def test_anchors_torchvision_strides_on_rounded_p6() -> None:
    h, w = 480, 640  # P5 is 15 x 20, P6 is 8 x 10: torchvision's P6 stride is 480 // 8 = 60, not 64
    grids = fpn_grid(h, w)
    assert grids[-1] == (8, 10)
    expected = torchvision_anchors(h, w, grids)
    tv_mode = AnchorGenerator(FPN_SIZES, RATIOS, FPN_STRIDES, torchvision_strides=True)
    assert torch.equal(torch.cat(tv_mode(grids, torch.device("cpu"), image_size=(h, w))), expected)
    # The declared-stride mode (detectron2's) differs exactly on the rounded level: the case is really exercised.
    declared = AnchorGenerator(FPN_SIZES, RATIOS, FPN_STRIDES)(grids, torch.device("cpu"))
    n_lower = sum(gh * gw * 3 for gh, gw in grids[:4])
    assert torch.equal(torch.cat(declared)[:n_lower], expected[:n_lower])
    assert not torch.equal(declared[-1], expected[n_lower:])
    # The cache is keyed on the strides too: the same grid under another padded size gives other anchors.
    other = tv_mode(grids, torch.device("cpu"), image_size=(512, 640))
    assert not torch.equal(other[-1], expected[n_lower:])
    assert torch.equal(torch.cat(tv_mode(grids, torch.device("cpu"), image_size=(h, w))), expected)


# --------------------------------------------------------------------------------------------- box coding
@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)])
def test_box_coder_equals_torchvision(weights: tuple[float, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    ours = BoxCoder(weights)
    tv = tv_utils.BoxCoder(weights, bbox_xform_clip=BBOX_XFORM_CLIP)
    reference = random_boxes(200, g)
    targets = jitter(reference, g, 0.5)
    enc = ours.encode(reference, targets)
    # measured: 0; atol=0: exact, the same arithmetic as torchvision
    torch.testing.assert_close(enc, tv.encode_single(targets, reference), rtol=0, atol=0)
    # Three classes of deltas per box, some with dw/dh beyond the clamp.
    deltas = torch.randn(200, 12, generator=g) * 2
    deltas[::7, 2::4] = 50.0
    dec = ours.decode(deltas, reference)
    assert dec.shape == (200, 12) and dec.dtype == torch.float32
    # measured: 0; atol=0: exact, the same arithmetic as torchvision
    torch.testing.assert_close(dec.view(200, 3, 4), tv.decode(deltas, [reference]), rtol=0, atol=0)
    # Batched (B, N, ...) layout decodes like the flat one.
    # measured: 0; atol=0: exact (batched and flat decoding are the same arithmetic)
    torch.testing.assert_close(ours.decode(deltas.view(4, 50, 12), reference.view(4, 50, 4)).view(200, 12), dec,
                               rtol=0, atol=0)


@pytest.mark.parametrize("weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0)])
def test_box_coder_decode_clamps_huge_deltas(weights: tuple[float, ...]) -> None:
    reference = torch.tensor([[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 16.0, 16.0]])
    for value in (1e4, 65504.0, -65504.0):
        deltas = torch.full((2, 4), value, dtype=torch.float16)  # fp16 range, as an autocast head produces
        boxes = BoxCoder(weights).decode(deltas, reference)
        assert boxes.dtype == torch.float32
        assert torch.isfinite(boxes).all(), f"delta {value}: {boxes}"
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ref_w, ref_h = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
        # A box grows at most 1000/16 times, whatever the delta.
        assert (w <= ref_w * 1000 / 16 * (1 + 1e-5)).all() and (h <= ref_h * 1000 / 16 * (1 + 1e-5)).all()
        if value > 0:
            # measured: 0 on all four deltas; assert_close's fp32 defaults
            torch.testing.assert_close(w, ref_w * 1000 / 16)


def test_box_coder_round_trip() -> None:
    g = torch.Generator().manual_seed(1)
    reference = random_boxes(500, g, max_xy=800, min_wh=8, max_wh=400)
    targets = random_boxes(500, g, max_xy=800, min_wh=8, max_wh=400)  # unrelated boxes: large deltas, in clamp range
    for weights in [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0), (2.0, 3.0, 0.5, 4.0)]:
        coder = BoxCoder(weights)
        deltas = coder.encode(reference, targets)
        assert deltas.abs().max() > 1  # not a trivial round trip
        # measured: 1.8e-4 px at most on boxes up to 1200 px, 0.08 of this rtol + atol allowance
        torch.testing.assert_close(coder.decode(deltas, reference), targets, rtol=1e-5, atol=1e-3)


def test_pairwise_iou_equals_torchvision() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = random_boxes(40, g), random_boxes(70, g)
    iou = pairwise_iou(a, b)
    assert (iou > 0).any() and (iou == 0).any()
    # measured: 0; atol=0: exact, the same arithmetic as torchvision
    torch.testing.assert_close(iou, box_iou(a, b), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- matcher
def tv_labels(matches: torch.Tensor) -> torch.Tensor:
    """torchvision's labelling of Matcher output: >= 0 foreground, -1 background, -2 ignored."""
    labels = (matches >= 0).to(torch.int8)
    labels[matches == tv_utils.Matcher.BETWEEN_THRESHOLDS] = -1
    return labels


def matching_problem(seed: int, counts: list[int], num_preds: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ground truth of several images (some without boxes) and predictions near them: jittered copies of
    the boxes (so IoUs spread over 0..1 and every box overlaps some prediction) plus random boxes."""
    g = torch.Generator().manual_seed(seed)
    gt = random_boxes(sum(counts), g)
    image = torch.cat([torch.full((c,), i, dtype=torch.int64) for i, c in enumerate(counts)])
    # Only every other box gets close copies: the others' best IoU stays below 0.7 (low-quality matches).
    near = torch.cat([jitter(gt[::2], g, 0.05), jitter(gt[::2], g, 0.15), jitter(gt, g, 0.4), jitter(gt, g, 0.6)])
    preds = torch.cat([near, random_boxes(num_preds - len(near), g)])
    return gt, image, preds[torch.randperm(len(preds), generator=g)]


@pytest.mark.parametrize(("high", "low", "allow_low_quality"), [(0.7, 0.3, True), (0.7, 0.3, False), (0.5, 0.5, False)])
def test_match_shared_equals_torchvision_per_image(high: float, low: float, allow_low_quality: bool) -> None:
    counts = [4, 0, 6]
    gt, image, preds = matching_problem(3, counts, 300)
    matched, labels = Matcher(high, low, allow_low_quality).match_shared(gt, image, preds, len(counts))
    assert matched.shape == labels.shape == (3, 300) and labels.dtype == torch.int8
    tv = tv_utils.Matcher(high, low, allow_low_quality_matches=allow_low_quality)
    start = 0
    for i, c in enumerate(counts):
        if c == 0:  # torchvision's RPN and RoI heads label everything background for an image without boxes
            assert (labels[i] == 0).all()
            continue
        expected = tv(box_iou(gt[start:start + c], preds))
        assert torch.equal(labels[i], tv_labels(expected)), f"image {i}"
        fg = labels[i] == 1
        assert torch.equal(matched[i][fg] - start, expected[fg]), f"image {i}"
        assert (image[matched[i][fg]] == i).all()
        start += c
    assert (labels == 1).sum() >= 5 and (labels == 0).sum() >= 10
    if low < high:
        assert (labels == -1).any()


def test_low_quality_matches_add_positives() -> None:
    # Not vacuous: with these boxes the low-quality rule turns some sub-threshold predictions into positives.
    gt, image, preds = matching_problem(3, [4, 0, 6], 300)
    with_lq = Matcher(0.7, 0.3, True).match_shared(gt, image, preds, 3)[1]
    without = Matcher(0.7, 0.3, False).match_shared(gt, image, preds, 3)[1]
    assert (with_lq == 1).sum() > (without == 1).sum()
    assert ((with_lq == 1) >= (without == 1)).all()


@pytest.mark.parametrize(("high", "low", "allow_low_quality"), [(0.5, 0.5, False), (0.7, 0.3, True)])
def test_match_per_image_equals_torchvision(high: float, low: float, allow_low_quality: bool) -> None:
    counts = [5, 0, 3]
    gt, image, preds = matching_problem(4, counts, 240)
    pred_image = torch.randint(0, 3, (240,), generator=torch.Generator().manual_seed(5))
    matched, labels = Matcher(high, low, allow_low_quality).match_per_image(gt, image, preds, pred_image)
    assert matched.shape == labels.shape == (240,)
    tv = tv_utils.Matcher(high, low, allow_low_quality_matches=allow_low_quality)
    start = 0
    for i, c in enumerate(counts):
        mine = pred_image == i
        if c == 0:
            assert (labels[mine] == 0).all()
            continue
        expected = tv(box_iou(gt[start:start + c], preds[mine]))
        assert torch.equal(labels[mine], tv_labels(expected)), f"image {i}"
        fg = labels[mine] == 1
        assert torch.equal(matched[mine][fg] - start, expected[fg]), f"image {i}"
        start += c
    assert (labels == 1).sum() >= 5 and (labels == 0).sum() >= 5


def test_matcher_without_any_ground_truth() -> None:
    preds = random_boxes(50, torch.Generator().manual_seed(0))
    empty = torch.zeros(0, 4)
    matched, labels = Matcher(0.7, 0.3, True).match_shared(empty, torch.zeros(0, dtype=torch.int64), preds, 2)
    assert matched.shape == labels.shape == (2, 50) and (labels == 0).all()
    matched, labels = Matcher(0.5, 0.5).match_per_image(empty, torch.zeros(0, dtype=torch.int64), preds,
                                                        torch.zeros(50, dtype=torch.int64))
    assert matched.shape == labels.shape == (50,) and (labels == 0).all()


# --------------------------------------------------------------------------------------------- sampler
def make_labels(rows: list[tuple[int, int]], n: int, seed: int = 0) -> torch.Tensor:
    """Rows with the given (positives, negatives), the rest ignored (-1), in random positions."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((len(rows), n), -1, dtype=torch.int8)
    for r, (p, q) in enumerate(rows):
        perm = torch.randperm(n, generator=g)
        out[r, perm[:p]] = 1
        out[r, perm[p:p + q]] = 0
    return out


def test_sample_balanced_rules() -> None:
    rows = [(300, 150), (5, 400), (3, 10), (0, 0), (0, 500), (40, 0)]
    labels = make_labels(rows, 500)
    batch, fraction = 64, 0.25
    index, valid = sample_balanced(labels, batch, fraction)
    assert index.shape == valid.shape == (len(rows), batch) and valid.dtype == torch.bool
    for r, (p, q) in enumerate(rows):
        picked = index[r][valid[r]]
        assert len(set(picked.tolist())) == len(picked), f"row {r}: an entry picked twice"
        got = labels[r][picked]
        assert (got != -1).all(), f"row {r}: an ignored entry was sampled"
        n_pos = min(p, int(batch * fraction))
        n_neg = min(q, batch - n_pos)
        assert int((got == 1).sum()) == n_pos, f"row {r}"
        assert int((got == 0).sum()) == n_neg, f"row {r}: negatives must fill the batch"
        assert int(valid[r].sum()) == n_pos + n_neg
        # Padding slots (too few candidates) are marked invalid: whatever they point at is unusable.
        if n_pos + n_neg < batch:
            assert not valid[r].all()
    # Rows 0, 1 and 4 fill the batch; rows 2, 3 and 5 cannot.
    assert valid[[0, 1, 4]].all() and not valid[3].any() and int(valid[2].sum()) == 13 and int(valid[5].sum()) == 16


def test_sample_balanced_fewer_candidates_than_batch_and_randomness() -> None:
    labels = make_labels([(4, 6), (2, 3)], 12)
    index, valid = sample_balanced(labels, 64, 0.5)
    assert index.shape == (2, 12)  # S = min(batch, N): the output shape is fixed by the input shape
    assert valid.sum(dim=1).tolist() == [10, 5]
    # Random choice among the positives: over many draws every positive of a large row is picked.
    labels = make_labels([(100, 100)], 300, seed=1)
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(300, dtype=torch.bool)
    for _ in range(150):
        index, valid = sample_balanced(labels, 16, 0.5, generator=g)
        seen[index[0][valid[0]]] = True
    assert bool(seen[labels[0] == 1].all()) and bool(seen[labels[0] == 0].all())
    assert not seen[labels[0] == -1].any()


@pytest.mark.parametrize(("rows", "n", "batch", "fraction"), [
    ([(300, 150), (5, 400), (3, 10), (0, 0), (0, 500), (40, 0)], 500, 64, 0.25),  # the RoI head's rule
    ([(12, 180), (200, 30), (1, 1)], 256, 256, 0.5),  # the RPN's rule
])
def test_sample_balanced_draws_what_torchvisions_sampler_draws(rows, n, batch, fraction) -> None:
    """Against torchvision's ``BalancedPositiveNegativeSampler`` (``randperm`` per image; ours is a random
    top-k over the whole batch, so the same seed gives other picks): the same number of positives and
    negatives in every row, and the same distribution, each candidate of a kind picked with probability
    ``count / candidates``. Measured over 2000 draws of each: the largest deviation of a candidate's pick
    rate from that probability is 3.6 and 3.5 (ours, the two cases) and 3.3 and 2.7 (torchvision) binomial
    standard deviations, among ~1,900 candidates (~3.5 is what chance gives the largest of so many); the bound is
    5 (a biased sampler, e.g. one that favours the first candidates, gives tens)."""
    labels = make_labels(rows, n)
    draws = 2000
    tv = tv_utils.BalancedPositiveNegativeSampler(batch, fraction)
    torch.manual_seed(0)
    tv_counts = torch.zeros(len(rows), n)
    for _ in range(draws):
        pos, neg = tv(list(labels))
        for r in range(len(rows)):
            tv_counts[r] += (pos[r] | neg[r]).float()
    g = torch.Generator().manual_seed(0)
    index, valid = sample_balanced(labels.repeat(draws, 1), batch, fraction, generator=g)
    our_counts = torch.zeros(len(rows) * draws, n).scatter_add_(1, index, valid.float()).view(draws, len(rows), n)
    our_counts = our_counts.sum(0)
    worst = {"ours": 0.0, "torchvision": 0.0}
    for r, (p, q) in enumerate(rows):
        n_pos = min(p, int(batch * fraction))
        n_neg = min(q, batch - n_pos)
        for kind, cand, k in (("positives", labels[r] == 1, n_pos), ("negatives", labels[r] == 0, n_neg)):
            for name, counts in (("ours", our_counts[r]), ("torchvision", tv_counts[r])):
                # Exactly k of this kind every draw (the totals), and none of the ignored.
                assert int(counts[cand].sum()) == k * draws, f"{name} row {r} {kind}"
                assert not counts[labels[r] == -1].any(), f"{name} row {r}: an ignored entry was sampled"
                if 0 < k < int(cand.sum()):
                    prob = k / int(cand.sum())
                    z = (counts[cand] / draws - prob).abs().max() / math.sqrt(prob * (1 - prob) / draws)
                    worst[name] = max(worst[name], float(z))
    assert worst["ours"] <= 5 and worst["torchvision"] <= 5, worst


# ------------------------------------------------------------------------------------------------ pooler
def test_roi_pooler_equals_torchvision_multiscale_roialign() -> None:
    g = torch.Generator().manual_seed(0)
    h, w = 256, 320
    strides = (4, 8, 16, 32)
    feats = [torch.randn(2, 8, h // s, w // s, generator=g) for s in strides]
    # Box sides from 8 to ~500 px so that every level gets boxes (sizes around 112, 224, 448 pick levels 3, 4, 5).
    sides = torch.cat([torch.rand(60, generator=g) * 100 + 8, torch.rand(60, generator=g) * 400 + 100])
    xy = torch.rand(120, 2, generator=g) * torch.tensor([w - 50.0, h - 50.0])
    aspect = torch.rand(120, generator=g) + 0.5
    boxes = torch.stack([xy[:, 0], xy[:, 1], xy[:, 0] + sides * aspect, xy[:, 1] + sides / aspect], dim=1)
    per_image = [boxes[:50], boxes[50:]]
    batch_index = torch.cat([torch.zeros(50, dtype=torch.int64), torch.ones(70, dtype=torch.int64)])
    pooler = RoIPooler(strides, 7, sampling_ratio=2)
    levels = pooler.level_of(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3}, "every level must be exercised"
    ours = pooler(feats, boxes, batch_index)
    tv = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
    expected = tv({str(i): f for i, f in enumerate(feats)}, per_image, [(h, w), (h, w)])
    assert ours.shape == (120, 8, 7, 7)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)  # measured: 0; atol=0: exact


@pytest.mark.parametrize("pooler_type", ["roi_align", "roi_pool"])
def test_roi_pooler_cpu_threads_equal_one_thread(pooler_type: str) -> None:
    """At inference on CPU, chunks of boxes are pooled on several threads: same bits as one thread."""
    g = torch.Generator().manual_seed(2)
    strides = (4, 8, 16, 32)
    feats = [torch.randn(2, 8, 256 // s, 320 // s, generator=g).contiguous(memory_format=torch.channels_last)
             for s in strides]
    sides = torch.cat([torch.rand(150, generator=g) * 60 + 8, torch.rand(50, generator=g) * 400 + 100])
    xy = torch.rand(200, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + sides[:, None]], dim=1)
    batch_index = (torch.arange(200) % 2).to(torch.int64)
    pooler = RoIPooler(strides, 7, pooler_type=pooler_type)
    single = RoIPooler([8], 7, pooler_type=pooler_type)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = pooler(feats, boxes, batch_index), single(feats[1:2], boxes, batch_index)
        torch.set_num_threads(2)
        assert pooler._use_cpu_threads(feats, boxes)
        with torch.inference_mode():
            threaded = pooler(feats, boxes, batch_index), single(feats[1:2], boxes, batch_index)
        # nothing to differentiate -> threads; a feature that needs a gradient -> the serial path
        needs_grad = [f.clone().requires_grad_() for f in feats]
        assert not pooler._use_cpu_threads(needs_grad, boxes)
        pooler(needs_grad, boxes, batch_index).sum().backward()
        assert all(f.grad is not None for f in needs_grad)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(serial, threaded):
        # measured: 0; atol=0: exact (thread count does not change the sums)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_roi_pooler_single_level_variants() -> None:
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(1, 4, 20, 20, generator=g)
    boxes = random_boxes(10, g, max_xy=200, max_wh=100)
    rois = torch.cat([torch.zeros(10, 1), boxes], dim=1)
    zeros = torch.zeros(10, dtype=torch.int64)
    for kind, aligned in (("roi_align", False), ("roi_align_v2", True)):
        out = RoIPooler([16], 14, sampling_ratio=0, pooler_type=kind)([feat], boxes, zeros)
        # measured: 0; atol=0: exact, the same arithmetic as torchvision
        torch.testing.assert_close(out, roi_align(feat, rois, 14, 1 / 16, 0, aligned=aligned), rtol=0, atol=0)
    # bf16 features (autocast) are pooled in fp32.
    out = RoIPooler([16], 7)([feat.bfloat16()], boxes, zeros)
    assert out.dtype == torch.float32


# ------------------------------------------------------------------------------------------------- heads
def test_rpn_head_layout_equals_torchvision() -> None:
    """Our (H, W, A) flattening of objectness and deltas matches torchvision's, so anchors line up."""
    ours = RPNHead(16, 3)
    tv = TVRPNHead(16, 3)
    with torch.no_grad():
        tv.conv[0][0].weight.copy_(ours.conv[0].weight)
        tv.conv[0][0].bias.copy_(torch.randn(16))
        ours.conv[0].bias.copy_(tv.conv[0][0].bias)
        for name_ours, name_tv in (("objectness", "cls_logits"), ("deltas", "bbox_pred")):
            getattr(tv, name_tv).weight.copy_(torch.randn_like(getattr(tv, name_tv).weight))
            getattr(tv, name_tv).bias.copy_(torch.randn_like(getattr(tv, name_tv).bias))
            getattr(ours, name_ours).load_state_dict(getattr(tv, name_tv).state_dict())
    feats = [torch.randn(2, 16, 8, 10), torch.randn(2, 16, 4, 5)]
    logits, deltas = ours(feats)
    assert logits.shape == (2, 3 * (80 + 20)) and deltas.shape == (2, 3 * (80 + 20), 4)
    tv_logits, tv_deltas = concat_box_prediction_layers(*tv(feats))
    # measured: 0 on both (the same weights, the same convs); assert_close's fp32 defaults
    torch.testing.assert_close(logits.reshape(-1, 1), tv_logits)
    torch.testing.assert_close(deltas.reshape(-1, 4), tv_deltas)


def tiny_heads(num_classes: int = 4) -> tuple[dict[str, torch.Tensor], RPN, RoIHeads, GroundTruth, torch.Tensor]:
    strides = (4, 8, 16, 32, 64)
    names = [f"p{int(math.log2(s))}" for s in strides]
    feats = {n: torch.randn(2, 8, 96 // s if s < 64 else 2, 128 // s if s < 64 else 2) for n, s in zip(names, strides)}
    anchors = AnchorGenerator(FPN_SIZES, RATIOS, strides)
    rpn = RPN(names, RPNHead(8, 3), anchors, pre_nms_topk=(300, 200), post_nms_topk=(100, 50),
              batch_size_per_image=32)
    box_head = TwoMLPHead(8, 7, 32)
    roi = RoIHeads(names[:4], RoIPooler(strides[:4], 7), box_head, num_classes, batch_size_per_image=16)
    gt = GroundTruth.from_targets([
        {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ], torch.device("cpu"))
    sizes = torch.tensor([[96, 128], [80, 100]])
    return feats, rpn, roi, gt, sizes


def test_rpn_and_roi_heads_shapes_and_losses() -> None:
    feats, rpn, roi, gt, sizes = tiny_heads()
    rpn.train()
    roi.train()
    proposals, valid, rpn_losses = rpn(feats, sizes, gt)
    assert proposals.shape == (2, 100, 4) and valid.shape == (2, 100) and valid.dtype == torch.bool
    assert set(rpn_losses) == {"loss_objectness", "loss_rpn_box_reg"}
    # Proposals lie inside their own image.
    for i, (hh, ww) in enumerate(sizes.tolist()):
        p = proposals[i][valid[i]]
        assert len(p) > 0
        assert (p[:, 0] >= 0).all() and (p[:, 2] <= ww).all() and (p[:, 1] >= 0).all() and (p[:, 3] <= hh).all()
    sampled = roi.sample(proposals, valid, gt)
    assert sampled["boxes"].shape == (2, 16, 4) and sampled["labels"].shape == (2, 16)
    assert sampled["fg"][0].any() and not sampled["fg"][1].any()  # image 1 has no ground truth
    assert set(sampled["labels"][0][sampled["fg"][0]].tolist()) <= {1, 3}
    none, roi_losses = roi(feats, proposals, valid, sizes, gt)
    assert none is None and set(roi_losses) == {"loss_classifier", "loss_box_reg"}
    total = sum(rpn_losses.values()) + sum(roi_losses.values())
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in (*rpn_losses.values(),
                                                                                           *roi_losses.values()))
    total.backward()
    assert rpn.head.objectness.weight.grad is not None and roi.predictor.cls_score.weight.grad is not None

    rpn.eval()
    roi.eval()
    with torch.no_grad():
        proposals, valid, losses = rpn(feats, sizes)
        assert proposals.shape == (2, 50, 4) and losses == {}
        dets, losses = roi(feats, proposals, valid, sizes)
    assert losses == {} and len(dets) == 2
    for i, d in enumerate(dets):
        assert set(d) == {"boxes", "scores", "labels"}
        n = len(d["boxes"])
        assert 0 < n <= 100 and d["boxes"].shape == (n, 4) and d["scores"].shape == (n,)
        assert d["labels"].dtype == torch.int64 and d["labels"].min() >= 1 and d["labels"].max() <= 3
        assert (d["scores"][:-1] >= d["scores"][1:]).all()  # sorted by score
        assert (d["boxes"][:, 2] <= sizes[i, 1]).all() and (d["boxes"][:, 3] <= sizes[i, 0]).all()


def test_rpn_inference_drops_padding_columns_only() -> None:
    """In eval mode the RPN returns only as many proposal columns as the fullest image fills (no box-head work
    on padding); the valid proposals are exactly those of the fixed-width (training-mode) layout."""
    feats, _, _, gt, sizes = tiny_heads()
    names = list(feats)
    rpn = RPN(names, RPNHead(8, 3), AnchorGenerator(FPN_SIZES, RATIOS, (4, 8, 16, 32, 64)),
              pre_nms_topk=(200, 200), post_nms_topk=(5000, 5000), batch_size_per_image=32)
    with torch.no_grad():
        rpn.train()
        fixed, fixed_valid, _ = rpn(feats, sizes, gt)
        rpn.eval()
        trimmed, valid, _ = rpn(feats, sizes)
    counts = fixed_valid.sum(1)
    assert fixed.shape[1] > int(counts.max()), "the fixed layout should carry padding in this setting"
    assert trimmed.shape[1] == int(counts.max()) and valid[:, -1].any()
    for i in range(len(sizes)):
        # measured: 0; atol=0: exact (the padding columns are dropped, the rest untouched)
        torch.testing.assert_close(trimmed[i][valid[i]], fixed[i][fixed_valid[i]], rtol=0, atol=0)


def test_fast_rcnn_predictor_shapes() -> None:
    pred = FastRCNNPredictor(32, 5)
    scores, deltas = pred(torch.randn(7, 32))
    assert scores.shape == (7, 5) and deltas.shape == (7, 20)


def test_low_quality_rule_needs_some_overlap() -> None:
    """A box that overlaps no prediction makes no low-quality match (detectron2's and this library's rule;
    torchvision's Matcher would instead mark every zero-IoU prediction as a match of that box)."""
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0], [500.0, 500.0, 520.0, 520.0]])
    preds = torch.tensor([[12.0, 12.0, 70.0, 70.0], [100.0, 100.0, 140.0, 140.0], [0.0, 200.0, 30.0, 260.0]])
    image = torch.zeros(2, dtype=torch.int64)
    _, labels = Matcher(0.7, 0.3, True).match_shared(gt, image, preds, 1)
    assert labels.tolist() == [[1, 0, 0]]
    _, labels = Matcher(0.7, 0.3, True).match_per_image(gt, image, preds, torch.zeros(3, dtype=torch.int64))
    assert labels.tolist() == [1, 0, 0]


# -------------------------------------------------------------------------------------------------- NMS
def test_batched_nms_exact_equals_per_group_nms() -> None:
    from torchvision.ops import batched_nms, nms

    from detection.boxes import batched_nms_exact

    g = torch.Generator().manual_seed(0)
    base = random_boxes(60, g, max_xy=100, max_wh=60)
    boxes = torch.cat([base, jitter(base, g, 0.1), jitter(base, g, 0.2)])  # heavy overlaps within and across groups
    scores = torch.rand(len(boxes), generator=g)
    groups = torch.randint(0, 5, (len(boxes),), generator=g)
    keep = batched_nms_exact(boxes, scores, groups, 0.5)
    expected = set()
    for k in range(5):
        idx = (groups == k).nonzero().squeeze(1)
        expected |= set(idx[nms(boxes[idx], scores[idx], 0.5)].tolist())
    assert set(keep.tolist()) == expected and len(keep) == len(expected)
    assert len(expected) < len(boxes) - 20  # NMS really suppressed boxes
    assert len(nms(boxes, scores, 0.5)) < len(expected) - 10  # ... and the groups matter
    assert (scores[keep][:-1] >= scores[keep][1:]).all(), "kept indices are sorted by decreasing score"
    assert set(batched_nms(boxes, scores, groups, 0.5).tolist()) == expected
    assert batched_nms_exact(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (0,)


# ------------------------------------------------------------------------------ invalid proposal slots
def test_roi_sampling_never_uses_invalid_proposals() -> None:
    """Padding slots of the proposal tensor (valid=False) are never sampled, even where they overlap
    the ground truth: only the real proposals and the ground-truth boxes themselves are candidates."""
    _, _, roi, _, _ = tiny_heads()
    gt_boxes = torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]])
    gt = GroundTruth.from_targets([{"boxes": gt_boxes, "labels": torch.tensor([1, 2])}], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    background = random_boxes(6, g, max_xy=30, max_wh=20) + torch.tensor([130.0, 0.0, 130.0, 0.0])
    near_gt = jitter(gt_boxes.repeat(3, 1), g, 0.02)  # IoU > 0.5 with the ground truth
    proposals = torch.cat([background, near_gt])[None]
    valid = torch.tensor([[True] * 6 + [False] * 6])
    sampled = roi.sample(proposals, valid, gt)
    picked = sampled["boxes"][0][sampled["valid"][0]]
    assert len(picked) == 8  # 6 background + 2 ground-truth boxes
    assert int(sampled["fg"].sum()) == 2
    for box in near_gt:
        assert not (picked == box).all(dim=1).any(), "an invalid proposal was sampled"
    assert sorted(sampled["labels"][0][sampled["fg"][0]].tolist()) == [1, 2]


def test_postprocess_ignores_invalid_proposals() -> None:
    _, _, roi, _, _ = tiny_heads()
    proposals = torch.tensor([[[0.0, 0.0, 20.0, 20.0], [40.0, 0.0, 60.0, 20.0], [0.0, 40.0, 20.0, 60.0],
                               [40.0, 40.0, 60.0, 60.0]]])
    valid = torch.tensor([[True, False, True, False]])
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0]]).repeat(4, 1)  # class 1 everywhere
    deltas = torch.zeros(4, 4 * 4)
    dets = roi.postprocess(logits, deltas, proposals, valid, torch.tensor([[100, 100]]))
    assert dets[0]["labels"].tolist() == [1, 1]
    # measured: 0; assert_close's fp32 defaults
    torch.testing.assert_close(dets[0]["boxes"].sort(dim=0).values, proposals[0][[0, 2]].sort(dim=0).values)


def test_rpn_losses_count_only_sampled_anchors() -> None:
    """Four anchors all positive, room for one positive and no negative: the second sampling slot is
    padding (it points at an unsampled positive) and must add nothing to either loss."""
    rpn = RPN(["p2"], RPNHead(4, 1), AnchorGenerator(((32,),), (1.0,), (4,)), batch_size_per_image=2,
              positive_fraction=0.5)
    gt_box = torch.tensor([[10.0, 10.0, 42.0, 42.0]])
    gt = GroundTruth.from_targets([{"boxes": gt_box, "labels": torch.tensor([1])}], torch.device("cpu"))
    anchors = torch.tensor([[11.0, 12.0, 43.0, 41.0]]).repeat(4, 1)
    logits, deltas = torch.zeros(1, 4), torch.zeros(1, 4, 4)
    losses = rpn._losses(anchors, logits, deltas, gt)
    target = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode(anchors[:1], gt_box)
    one_anchor = torch.nn.functional.smooth_l1_loss(torch.zeros(1, 4), target, beta=1 / 9, reduction="sum")
    # measured: 0 on both; assert_close's fp32 defaults
    torch.testing.assert_close(losses["loss_rpn_box_reg"], one_anchor)
    torch.testing.assert_close(losses["loss_objectness"], torch.tensor(math.log(2.0)))
