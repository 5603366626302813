"""The CUDA paths worth checking, in one command: ``pytest tests/engine/test_cuda.py`` on a GPU machine.

- the trainer's step: no host-device synchronisation, bf16 autocast, fp16 with a GradScaler, exact resume
  with the CUDA RNG (fake detector, deterministic cuDNN);
- the real tiny detector: bf16 and fp16 training steps agree with fp32 and train; the real stack (the
  ``resnet-det train`` command, real loader with 2 workers) killed inside a checkpoint write and resumed
  on the GPU continues the run; the prepared model (``prepare_for_inference``: frozen BN folded,
  channels_last) gives the eager model's detections in fp32 and bf16.

Skipped without CUDA (CI has none). The measured agreement is printed (``-s``) for the record; the CPU twins
of these tests run everywhere (tests/reliability).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import faults
import numpy as np
import pytest
import torch
from engine_fakes import FakeDetector, FakeLoader, FixedBatchLoader, with_options
from parity_helpers import perturb_frozen_bn
from safetensors.torch import load_file
from torchvision.ops import box_iou

from detection.models import build_faster_rcnn
from resnet_det.config import SolverConfig, load_config
from resnet_det.engine import (
    Checkpointer,
    ModelEma,
    Trainer,
    TrainerOptions,
    build_lr_scheduler,
    build_optimizer,
    build_trainer,
)
from resnet_det_common import autocast

REPO = Path(__file__).resolve().parents[2]
DEVICE = "cuda"

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SOLVER = SolverConfig(lr=0.05, max_iter=8, steps=(6,), gamma=0.5, warmup_iters=2)


@pytest.fixture(autouse=True)
def _deterministic():
    # Bitwise comparisons between runs need deterministic cuDNN kernels.
    prev = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev


def _trainer(out, *, max_iter, seed=0, make=FakeDetector, **kw) -> Trainer:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = make().cuda()
    opt = build_optimizer(model, SOLVER)
    kw = {"progress": False, "curves": False, "log_period": 1, "checkpoint_period": 100, **kw}
    return Trainer(model, opt, build_lr_scheduler(opt, SOLVER), FakeLoader(), device="cuda", max_iter=max_iter,
                   output_dir=out, **with_options(kw))


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_training_steps_do_not_synchronise_with_the_host(tmp_path, amp):
    trainer = _trainer(tmp_path, max_iter=10, amp=amp, clip_grad_norm=5.0)
    trainer.run_step()  # first step: lazy CUDA/cuDNN initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.run_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(dt == (torch.bfloat16 if amp == "bf16" else torch.float32) for dt in trainer.model.autocast_dtypes)


def test_ema_and_accumulation_add_no_host_synchronisation(tmp_path):
    # The EMA's decay is a Python float of the update count, accumulation only loops: device ops only.
    trainer = _trainer(tmp_path, max_iter=10, accumulate=2, clip_grad_norm=5.0)
    trainer.ema = ModelEma(trainer.model, decay=0.99, warmup_iters=3)
    trainer.run_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.run_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.ema.updates == 4


def test_fp16_with_grad_scaler_on_cuda(tmp_path):
    trainer = _trainer(tmp_path, max_iter=6, amp="fp16", clip_grad_norm=5.0)
    result = trainer.train()
    assert trainer.scaler.is_enabled() and trainer.model.autocast_dtypes == [torch.float16] * 6
    assert all(np.isfinite(v) for v in result["losses"].values())
    assert Checkpointer(tmp_path).load("model_final")[1]["grad_scaler"]["scale"] > 0


def test_resume_on_cuda_is_exact_including_the_cuda_rng(tmp_path):
    a = _trainer(tmp_path / "a", max_iter=8)
    a.train()
    b1 = _trainer(tmp_path / "b", max_iter=4)
    b1.train()
    state = Checkpointer(tmp_path / "b").load("model_final")[1]
    assert "cuda" in state["rng"][0]  # dropout on the GPU draws from the CUDA generator
    b2 = _trainer(tmp_path / "b", max_iter=8, seed=5)
    b2.train(resume=True)

    def history(out):
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["iteration"]: (r["losses"], r["lr"]) for r in recs if r["type"] == "train"}

    ha, hb = history(tmp_path / "a"), history(tmp_path / "b")
    assert sorted(hb) == list(range(1, 9))
    # measured: not yet: needs a CUDA GPU (none where these tests were annotated). Deterministic cuDNN and the
    # saved CUDA RNG should make both checks exact; 1e-6 is headroom, to replace by the figures printed here (-s).
    loss_gap = max(abs(hb[it][0][k] - v) for it in range(1, 9) for k, v in ha[it][0].items())
    weight_gap = max((b2.model.state_dict()[k] - v).abs().max().item() for k, v in a.model.state_dict().items())
    print(f"\nresumed vs uninterrupted on CUDA: losses {loss_gap:.1e}, weights {weight_gap:.1e}")
    for it in range(1, 9):
        assert hb[it][1] == ha[it][1]
        for k, v in ha[it][0].items():
            assert hb[it][0][k] == pytest.approx(v, abs=1e-6), (it, k)
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(b2.model.state_dict()[k], v, rtol=0, atol=1e-6)


def test_build_trainer_bf16_channels_last_on_cuda(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("solver: {max_iter: 4, warmup_iters: 1, steps: [3], ims_per_batch: 2}\n")
    cfg = load_config(cfg_file, [f"train.output_dir={tmp_path / 'run'}", "train.amp=bf16", "train.channels_last=true",
                                 "train.log_period=2"])
    torch.manual_seed(0)
    trainer = build_trainer(cfg, FakeDetector(), FakeLoader(), progress=False)
    assert trainer.device.type == "cuda" and trainer.model.conv.weight.is_cuda
    result = trainer.train()
    assert result["iteration"] == 4
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["max_mem_mb"] > 0 for r in recs if r["type"] == "train")
    assert (tmp_path / "run" / "curves.png").is_file()


# ------------------------------------------------------------------------------- the real tiny detector


def _tiny_detector(**overrides: Any) -> torch.nn.Module:
    cfg = load_config(REPO / "configs/shapes/faster_rcnn_R_50_FPN.yaml", faults.TINY)
    torch.manual_seed(0)
    return build_faster_rcnn(cfg.model.replace(num_classes=4, **overrides))


def _shapes_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[torch.Tensor], list[dict]]:
    """Four 64-px images of the synthetic shapes val split with their boxes (on the CPU)."""
    from resnet_det.engine.launch import build_dataset
    from resnet_det.tasks.detection import TASKS

    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path / "cache"))
    cfg = load_config(REPO / "configs/shapes/faster_rcnn_R_50_FPN.yaml", faults.TINY)
    (task,) = [t for t in TASKS if t.name == "detection"]
    val = build_dataset(cfg, task, "val")
    items = [val[i] for i in range(4)]
    return [im for im, _ in items], [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in items]


def _to(images: list[torch.Tensor], targets: list[dict], device: str) -> tuple[list[torch.Tensor], list[dict]]:
    return [im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_real_detector_autocast_training_steps_on_cuda(tmp_path, monkeypatch, amp):
    images, targets = _shapes_batch(tmp_path, monkeypatch)
    model = _tiny_detector().to(DEVICE).train()
    gpu_images, gpu_targets = _to(images, targets, DEVICE)

    def losses(precision: str) -> dict[str, float]:
        torch.manual_seed(123)  # the same RPN / RoI sampling draws
        with torch.no_grad(), autocast(DEVICE, precision):
            return {k: float(v) for k, v in model(gpu_images, gpu_targets).items()}

    fp32, low = losses("off"), losses(amp)
    rel = {k: abs(low[k] - fp32[k]) / abs(fp32[k]) for k in fp32}
    print(f"\n{amp} vs fp32 losses on {DEVICE}: " + ", ".join(f"{k} {v:.1e}" for k, v in rel.items()))
    # Bounds from the CPU measurement (tests/reliability/test_mixed_precision.py: RPN 2e-5, RoI 1.5e-2) with room
    # for TF32, which cuDNN uses for the fp32 reference itself on recent GPUs.
    assert rel["loss_objectness"] <= 1e-2 and rel["loss_rpn_box_reg"] <= 1e-2, rel
    assert rel["loss_classifier"] <= 1e-1 and rel["loss_box_reg"] <= 1e-1, rel

    opt = build_optimizer(model, SOLVER)
    trainer = Trainer(model, opt, build_lr_scheduler(opt, SOLVER), FixedBatchLoader(images, targets), device=DEVICE,
                      max_iter=3, output_dir=tmp_path / "run", amp=amp, clip_grad_norm=10.0,
                      options=TrainerOptions(progress=False, curves=False, log_period=1, checkpoint_period=100))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = trainer.train()
    assert result["iteration"] == 3 and all(np.isfinite(v) for v in result["losses"].values())
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    if amp == "fp16":
        assert Checkpointer(tmp_path / "run").load("model_final")[1]["grad_scaler"]["scale"] > 0


def _max_relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b)


def test_real_stack_killed_in_a_checkpoint_write_resumes_on_cuda(tmp_path):
    env = {"RESNET_DET_CACHE": str(tmp_path / "cache")}

    def argv(out: Path, *extra: str) -> list[str]:
        return faults.train_argv(out, f"train.device={DEVICE}", *extra)

    for name in ("a", "a2"):
        code, log = faults.run_cli(argv(tmp_path / name), log=tmp_path / f"{name}.log", env=env)
        assert code == 0, log[-3000:]
    code, log = faults.run_cli(argv(tmp_path / "b"), log=tmp_path / "b.log", fault="half_kill:safetensors@2", env=env)
    assert code == -9, log[-3000:]
    code, log = faults.run_cli(argv(tmp_path / "b", "--resume"), log=tmp_path / "b_resume.log", env=env)
    assert code == 0, log[-3000:]
    assert "resumed from model_0000001 at iteration 1" in log

    states = {n: torch.load(tmp_path / n / "model_final.state.pt", weights_only=True) for n in ("a", "b")}
    assert states["a"]["iteration"] == states["b"]["iteration"] == faults.ITERS
    assert states["a"]["loader"] == states["b"]["loader"]
    assert "cuda" in states["a"]["rng"][0]  # the CUDA generator is part of the saved state
    for gen, value in states["a"]["rng"][0].items():
        got = states["b"]["rng"][0][gen]
        assert (torch.equal(got, value) if isinstance(value, torch.Tensor) else str(got) == str(value)), gen
    # RoIAlign's backward accumulates with atomics on a GPU: two uninterrupted runs differ by a little already.
    # The resumed run must be no farther from the first than that (plus float32 rounding).
    weights = {n: load_file(tmp_path / n / "model_final.safetensors") for n in ("a", "a2", "b")}
    noise = _max_relative_gap(weights["a2"], weights["a"])
    gap = _max_relative_gap(weights["b"], weights["a"])
    print(f"\nresumed vs uninterrupted: {gap:.1e} of scale; two uninterrupted runs: {noise:.1e}")
    assert gap <= max(10 * noise, 1e-5), (gap, noise)


def _confident_tiny_detector() -> torch.nn.Module:
    """Frozen BN with non-trivial statistics (something to fold) and spread classifier scores."""
    model = _tiny_detector(backbone_norm="FrozenBN")
    perturb_frozen_bn(model, seed=0)
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.weight.mul_(50.0)
    return model


@pytest.mark.parametrize(("amp", "share"), [("off", 0.95), ("bf16", 0.85)])  # CPU: 80/80 and 79/80
def test_prepared_inference_on_cuda_gives_the_eager_detections(tmp_path, monkeypatch, amp, share):
    images, _ = _shapes_batch(tmp_path, monkeypatch)
    images = [im.to(DEVICE) for im in images]
    model = _confident_tiny_detector().to(DEVICE).eval()
    with torch.no_grad():
        eager = model(images)  # the reference: eager fp32
        model.prepare_for_inference()
        with autocast(DEVICE, amp):
            prepared = model(images)
    assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules()), "frozen BN folded"
    found = total = 0
    for e, p in zip(eager, prepared):
        top = min(20, len(e["boxes"]))
        assert top >= 10
        iou = box_iou(e["boxes"][:top].float(), p["boxes"].float())
        found += int(((iou >= 0.9) & (e["labels"][:top, None] == p["labels"][None])).any(dim=1).sum())
        total += top
    print(f"\nprepared ({amp}) vs eager fp32: {found} of the {total} best detections found")
    assert found >= share * total, (found, total)
