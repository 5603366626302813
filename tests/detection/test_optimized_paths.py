"""Every optimised inference path gives the eager model's detections: the static-shape, sync-free predictor
(`detection.static`, CUDA graphs on a GPU) and its fixed-shape NMS, proven on CPU where they run on CPU."""

from __future__ import annotations

import pytest
import torch
from parity_helpers import match_detections, per_group_nms

from detection.models import build_faster_rcnn
from detection.static import StaticPredictor, cluster_nms

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(backbone_name="resnet18", backbone_width=8, num_classes=7, backbone_norm="FrozenBN", fpn_channels=32,
            fc_dim=64, min_size=(128,), max_size=160, test_min_size=128, test_max_size=160,
            rpn_pre_nms_topk=(600, 300), rpn_post_nms_topk=(300, 150))


@pytest.mark.parametrize("iterations", [None, 64])
def test_cluster_nms_is_greedy_nms(iterations: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    n = 400
    xy = torch.rand(2, n, 2, generator=g) * 300  # dense: long chains of suppression
    boxes = torch.cat([xy, xy + torch.rand(2, n, 2, generator=g) * 120 + 2], dim=-1)
    scores = torch.rand(2, n, generator=g)
    groups = torch.randint(0, 3, (2, n), generator=g)
    valid = torch.rand(2, n, generator=g) > 0.1
    order = scores.argsort(dim=1, descending=True)
    sb, sv, sg = (boxes.gather(1, order[..., None].expand(-1, -1, 4)), valid.gather(1, order),
                  groups.gather(1, order))
    for thr in (0.3, 0.7):
        keep, converged = cluster_nms(sb, sv, thr, groups=sg, iterations=iterations)
        assert bool(converged)
        for i in range(2):
            idx = valid[i].nonzero().squeeze(1)
            ref = {int(idx[k]) for k in per_group_nms(boxes[i][idx], scores[i][idx], groups[i][idx], thr)}
            assert set(order[i][keep[i]].tolist()) == ref, (thr, i)


def test_cluster_nms_reports_a_chain_longer_than_its_steps() -> None:
    # box k overlaps box k+1 only (IoU 0.09): greedy keeps 0, 2, 4, ...; each step settles one more link of the chain
    boxes = torch.tensor([[10.0 * k, 0, 10.0 * k + 12, 10] for k in range(12)])
    valid = torch.ones(12, dtype=torch.bool)
    keep, converged = cluster_nms(boxes, valid, 0.05, iterations=3)
    assert not bool(converged)
    keep, converged = cluster_nms(boxes, valid, 0.05)
    assert bool(converged) and keep.nonzero().squeeze(1).tolist() == list(range(0, 12, 2))
    keep, converged = cluster_nms(boxes, valid, 0.05, iterations=13)
    assert bool(converged) and keep.nonzero().squeeze(1).tolist() == list(range(0, 12, 2))
    empty, ok = cluster_nms(torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool), 0.5, iterations=2)
    assert empty.numel() == 0 and bool(ok)


def _model_with_detections(**overrides) -> torch.nn.Module:
    """The tiny detector with a classifier that gives varied classes and many detections (random features
    share one large component; classifier rows orthogonal to it spread the scores)."""
    torch.manual_seed(0)
    model = build_faster_rcnn(**{**TINY, **overrides}).eval()
    feats = {}
    hook = model.roi_heads.box_head.register_forward_hook(lambda m, i, o: feats.__setitem__("x", o))
    with torch.no_grad():
        model(_images())
    hook.remove()
    mu = feats["x"].mean(0)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(model.roi_heads.predictor.cls_score.weight.shape, generator=g)
    w -= (w @ mu)[:, None] * mu[None] / (mu @ mu)
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.weight.copy_(w * 4 / (feats["x"] @ w.T).std())
        model.roi_heads.predictor.bbox_pred.weight.normal_(0, 0.01, generator=g)
    return model


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.rand(3, h, w, generator=g) for h, w in ((100, 120), (150, 100), (90, 90))]


def _check_same(ref: list[dict], got: list[dict]) -> None:
    assert len(ref) == len(got)
    for i, (r, o) in enumerate(zip(ref, got)):
        assert len(r["boxes"]) >= 30, "enough detections for the comparison to mean something"
        match_detections(r, o, f"image {i}")  # same label, score within 1e-4, box within 0.01 px


@pytest.mark.parametrize(("pooling", "fixed", "dtype"), [("grouped", False, "fp32"), ("all-levels", True, "fp32"),
                                                         ("all-levels", True, "bf16")])
def test_static_predictor_gives_the_eager_detections(pooling: str, fixed: bool, dtype: str) -> None:
    model = _model_with_detections().prepare_for_inference()
    canvas = (160, 192)  # every image of the batch fits; more padding than the eager model would add
    predictor = StaticPredictor(model, canvas=canvas, pooling=pooling, fixed_iterations=fixed, dtype=dtype)
    images = _images()
    model.preprocessor.fixed_size = canvas
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        ref = model(images)
    got = predictor(images)
    assert predictor.fallbacks == 0
    _check_same(ref, got)
    for r, o in zip(ref, got):  # same coordinates: the input image's own
        # measured: 0 in all 9 variants (bf16 included) on this 2-core CPU; the 1e-3 px stays for CPUs whose kernels
        # block the static shapes otherwise
        assert torch.allclose(r["boxes"], o["boxes"], atol=1e-3)


def test_static_predictor_without_canvas_pads_as_the_eager_model() -> None:
    model = _model_with_detections()
    with torch.no_grad():
        ref = model(_images())
    _check_same(ref, StaticPredictor(model)(_images()))


def test_static_predictor_falls_back_to_the_eager_heads_when_a_fixed_step_is_not_exact() -> None:
    model = _model_with_detections()
    images = _images()
    with torch.no_grad():
        ref = model(images)
    predictor = StaticPredictor(model, pooling="all-levels", fixed_iterations=True, nms_iterations=1)
    _check_same(ref, predictor(images))
    assert predictor.fallbacks == 1
    few = StaticPredictor(model, fixed_iterations=True, max_candidates=1)  # fewer candidates than detections
    _check_same(ref, few(images))
    assert few.fallbacks == 1


def test_the_fixed_path_has_no_data_dependent_shape() -> None:
    """torch.compile(fullgraph=True) refuses any op whose output shape depends on values (nonzero, item,
    tolist, boolean indexing): what a CUDA graph cannot capture either."""
    model = _model_with_detections().prepare_for_inference()
    predictor = StaticPredictor(model, canvas=(160, 192), pooling="all-levels", fixed_iterations=True)
    batch, sizes, _ = model.preprocessor(_images(), fixed_size=(160, 192))
    image_sizes = torch.tensor(sizes)
    torch._dynamo.reset()
    traced = torch.compile(predictor.forward_fixed, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        got, ref = traced(batch, image_sizes), predictor.forward_fixed(batch, image_sizes)
    assert bool(got["ok"]) and torch.equal(got["valid"], ref["valid"]) and torch.equal(got["boxes"], ref["boxes"])


def test_bad_settings_are_refused() -> None:
    model = _model_with_detections()
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        StaticPredictor(model, cuda_graph=True)
    with pytest.raises(ValueError, match="pooling='fast'"):
        StaticPredictor(model, pooling="fast")
    with pytest.raises(ValueError, match=r"fixed_size \(64, 64\) must hold the batch"):
        StaticPredictor(model, canvas=(64, 64))(_images())
    with pytest.raises(TypeError, match=r"needs a detection\.FasterRCNN"):
        StaticPredictor(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graph_predictor_gives_the_eager_detections(dtype: str) -> None:
    model = _model_with_detections().cuda().prepare_for_inference()
    canvas = (160, 192)
    predictor = StaticPredictor(model, canvas=canvas, dtype=dtype)
    assert predictor.cuda_graph and predictor.fixed_iterations
    images = [i.cuda() for i in _images()]
    model.preprocessor.fixed_size = canvas
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        ref = model(images)
    for _ in range(2):  # capture, then replay
        got = predictor(images)
        _check_same([{k: v.cpu() for k, v in r.items()} for r in ref],
                    [{k: v.cpu() for k, v in o.items()} for o in got])
    assert predictor.fallbacks == 0


# ------------------------------------------------------------------------------ fused CPU convolutions
@pytest.mark.parametrize("depth", [18, 50])
def test_fused_cpu_inference_gives_the_unfused_features(depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folded BN + conv, bias, ReLU and residual / FPN additions as one oneDNN kernel: the same maps in fp32
    (fused here on purpose: by default only bf16 autocast fuses), close ones under bf16 autocast."""
    import backbone.layers
    from backbone import FPN, FrozenBatchNorm2d, ResNet
    from backbone.layers import Conv2d, enable_fused_inference, fold_frozen_batchnorm

    monkeypatch.setattr(backbone.layers, "FUSED_DTYPES", (torch.float32, torch.bfloat16))
    torch.manual_seed(0)
    net = FPN(ResNet(depth, width=8, norm="FrozenBN", out_features=("res2", "res3", "res4", "res5")),
              out_channels=16).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        fold_frozen_batchnorm(net)
        net.to(memory_format=torch.channels_last)
        x = torch.rand(2, 3, 96, 128).contiguous(memory_format=torch.channels_last)
        ref = net(x)
        assert enable_fused_inference(net) > 10
        calls = []
        fused = Conv2d.forward_fused
        monkeypatch.setattr(Conv2d, "forward_fused", lambda self, *a, **k: calls.append(k) or fused(self, *a, **k))
        got = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16 = {k: v.float() for k, v in net(x).items()}
    assert len(calls) > 10 and any("add" in k for k in calls), "the fused kernels ran, residual adds included"
    for k in ref:
        # measured: 0 on all levels here (the fused kernels round alike on this CPU); 1e-5 kept for other ISAs
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5)
        scale = ref[k].abs().max()
        # measured: 1.8e-2 of the level's largest value at most (R-18 and R-50, bf16's 8-bit mantissa through the
        # trunk); 0.05 bounds it
        assert (ref_bf16[k] - ref[k]).abs().max() <= 0.05 * scale, f"{k}: bf16 autocast stays close"
    calls.clear()
    net.train()
    loss = sum(v.sum() for v in net(x.requires_grad_()).values())
    loss.backward()
    assert not calls and x.grad is not None, "training and autograd take the plain path"


# ------------------------------------------------------------------------- threaded RoIAlign (CPU)
@pytest.mark.parametrize(("aligned", "channels_last"), [(False, False), (True, False), (False, True)])
def test_channel_parallel_roi_align_gives_torchvisions_values_and_gradients(aligned: bool, channels_last: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.ops import roi_align

    import detection.poolers as poolers
    from detection.poolers import RoIPooler

    calls = []
    apply = poolers._ChannelParallelRoIAlign.apply
    monkeypatch.setattr(poolers._ChannelParallelRoIAlign, "apply", lambda *a: calls.append(1) or apply(*a))

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 12, 40, 48, generator=g), torch.randn(2, 12, 20, 24, generator=g)]
    if channels_last:
        feats = [f.to(memory_format=torch.channels_last) for f in feats]
    xy = torch.rand(150, 2, generator=g) * 150
    boxes = torch.cat([xy, xy + torch.rand(150, 2, generator=g) * 120 + 1], dim=1)
    batch_index = torch.randint(0, 2, (150,), generator=g)
    pooler = RoIPooler([4, 8], 7, pooler_type="roi_align_v2" if aligned else "roi_align")
    previous = torch.get_num_threads()
    results = []
    for threads in (1, 2):  # 1: torchvision's kernels as they are; 2: channel slices on two threads
        torch.set_num_threads(threads)
        try:
            xs = [f.clone().requires_grad_() for f in feats]
            out = pooler(xs, boxes, batch_index)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            results.append((out.detach(), [x.grad for x in xs]))
        finally:
            torch.set_num_threads(previous)
    assert calls, "two threads took the channel-parallel path"
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    # measured: 0 here (2 threads); atol 1e-6 for another split of the channels' sums
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    level0 = pooler.level_of(boxes) == 0
    rois = torch.cat([batch_index[:, None].float(), boxes], 1)
    ref = roi_align(feats[0], rois[level0], 7, 0.25, 2, aligned=aligned)
    assert torch.equal(o2[level0], ref)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_backbone_gives_the_eager_detections(backend: str) -> None:
    """`torch.compile` of the backbone + FPN (`train.compile`, `benchmark --compile`, `StaticPredictor(...,
    compile_backbone=True)`) gives the eager detections. aot_eager checks the captured graph (the layers take
    their plain path under the compiler, not the fused oneDNN one); inductor also its generated CPU code."""
    import shutil

    if backend == "inductor" and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor's CPU code generation needs a C++ compiler (g++), which this machine lacks")
    torch._dynamo.reset()
    model = _model_with_detections().prepare_for_inference()
    images = _images()
    with torch.inference_mode():
        ref = model(images)
    model.backbone = torch.compile(model.backbone, backend=backend, dynamic=False)
    with torch.inference_mode():
        got = model(images)
    _check_same(ref, got)


def test_compiled_backbone_training_step_gives_the_eager_losses_and_gradients() -> None:
    """A training step through the compiled backbone (graph captured with AOT autograd) gives the eager losses
    and gradients (same convolutions; tolerance: fp32 summation order, measured max 0 here)."""
    torch._dynamo.reset()
    images = _images()
    targets = [{"boxes": torch.tensor([[5.0, 8.0, 60.0, 70.0], [30.0, 20.0, 85.0, 88.0]]),
                "labels": torch.tensor([1, 5])} for _ in images]
    results = []
    for compiled in (False, True):
        model = _model_with_detections().train()
        if compiled:
            model.backbone = torch.compile(model.backbone, backend="aot_eager", dynamic=False)
        torch.manual_seed(5)  # the RPN / RoI samplers' draws
        losses = model(images, targets)
        sum(losses.values()).backward()
        grads = {n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    (ref_losses, ref_grads), (losses, grads) = results
    assert set(losses) == set(ref_losses) and set(grads) == set(ref_grads) and len(grads) > 20
    for k in ref_losses:
        # measured: 0 on the losses and all 45 gradients (aot_eager runs the eager kernels); kept for the graph's own op
        # order elsewhere
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-5, atol=1e-6)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_pool_threads_run_torch_ops_on_one_openmp_thread() -> None:
    """The CPU pooling threads get no OpenMP team of their own (with one, the main thread's convolutions ran at
    half speed: see detection/poolers.py), and the main thread keeps its thread count."""
    import sys

    import detection.poolers as poolers

    if sys.platform != "linux" or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("the pin targets the OpenMP runtime of torch's Linux builds")
    assert poolers._openmp_pin() is not None, "torch's OpenMP runtime was not found: CPU pooling runs serially"
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inside = poolers._executor(2).submit(torch.get_num_threads).result()
        assert inside == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
