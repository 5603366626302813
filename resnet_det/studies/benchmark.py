"""Speed and memory of our Faster R-CNN against torchvision's: same process, same weights, same inputs.

What makes the figures trustworthy (each point is tested in tests/studies/test_benchmark.py):

- **Same model, same load.** torchvision's detector is built with a seeded initialisation and its
  weights are loaded into ours (`detection.convert`), so both run the same network and their
  post-processing sees the same candidates: the detection counts per image are recorded for every
  inference row and should match.
- **Same settings.** Each row says what the model ran in (dtype, channels_last, compiled backbone,
  static shapes). "like for like" ratios only pair rows whose settings are equal; "each at its best"
  ratios pair the fastest row of each side and are labelled so.
- **Interleaved repeats.** After each model's warm-up, the timed calls of all models alternate
  (A, B, A, B, ...; the first model changes from repeat to repeat), `iters` calls per repeat and
  `repeats` repeats (3 by default). A row reports the median of the per-repeat medians and their
  min-max; ratios are taken per repeat (each repeat's models shared the machine's state) and
  reported as their median and min-max.
- **Memory per model.** CPU: each model runs in a process of its own and its peak resident set is
  read there (`VmHWM`, reset after the warm-up through `/proc/self/clear_refs` where Linux allows
  it, else `ru_maxrss` of the whole child). CUDA: in process, the peak of `max_memory_allocated`
  over one call minus what was allocated before the model was built (other models stay idle), plus
  the shared inputs.
- **Records.** The JSON holds the full command, the date, versions, device name, thread counts, the
  environment variables that change speed (GLIBC_TUNABLES, OMP_NUM_THREADS, ...), the settings and
  iteration counts, every repeat's figure and the detection counts.

Variants (`models`): `ours` and `torchvision` run in the run's settings (`channels_last`, `compile`);
`torchvision-cl` is torchvision in channels_last; `ours-prepared` is ours after
`prepare_for_inference()` (frozen BN folded, channels_last); `ours-static` is the static-shape,
sync-free predictor (`detection.static.StaticPredictor`, CUDA graphs on a GPU) on the prepared model;
`ours-onnx` is ours exported with `detection.export.export_onnx` and run by ONNX Runtime (CPU, as many intra-op
threads as torch uses, one image per call: the graph takes one uint8 image), fp32 only. The last three are
inference-only.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet_det_common import autocast

ARCHS = {"R50-FPN": "resnet50", "R101-FPN": "resnet101", "R18-FPN": "resnet18"}
VARIANTS = ("ours", "ours-prepared", "ours-static", "ours-onnx", "torchvision", "torchvision-cl")
INFERENCE_ONLY = ("ours-prepared", "ours-static", "ours-onnx")
FP32_ONLY = ("ours-onnx",)  # the exported graph computes in fp32
MEMORY_METHODS = ("auto", "subprocess", "inprocess", "off")
# Environment variables that change CPU/GPU speed or memory; recorded with every run.
ENV_PREFIXES = ("OMP_", "KMP_", "MKL_", "GOMP_", "DNNL_", "ONEDNN_", "PYTORCH_", "TORCH_", "TORCHINDUCTOR_",
                "CUDA_", "CUBLAS_", "CUDNN_", "NVIDIA_TF32", "NCCL_")
ENV_NAMES = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run measures; `asdict` of it goes into the JSON record.

    Attributes:
        archs: keys of `ARCHS`.
        dtypes: "fp32", or "bf16" / "fp16" autocast.
        device: "cpu", "cuda", "cuda:1", ...
        height / width: size of the random input images (both models resize them the same way).
        train_batch / infer_batches: images per training step / per inference call.
        iters / warmup / repeats: timed calls per repeat, untimed calls per model first, repeats.
        channels_last / compile: run settings of `ours` and `torchvision` (compile: `torch.compile` of the
            backbone + FPN); `torchvision-cl` is channels_last whatever `channels_last` says.
        models: variants to measure (see `VARIANTS`).
        modes: "train" and/or "infer".
        memory: "auto" (CUDA: in process; CPU: a process per model), "subprocess", "inprocess" or "off".
        model_size: the detectors' `(min_size, max_size)` resize rule (torchvision's 800 / 1333).
        seed: initialisation and input seed.
        boxes_per_image: ground-truth boxes per training image.
    """

    archs: tuple[str, ...] = ("R50-FPN",)
    dtypes: tuple[str, ...] = ("fp32",)
    device: str = "cpu"
    height: int = 800
    width: int = 1333
    train_batch: int = 8
    infer_batches: tuple[int, ...] = (1, 8)
    iters: int = 15
    warmup: int = 3
    repeats: int = 3
    channels_last: bool = False
    compile: bool = False
    models: tuple[str, ...] = ("ours", "torchvision")
    modes: tuple[str, ...] = ("train", "infer")
    memory: str = "auto"
    model_size: tuple[int, int] = (800, 1333)
    seed: int = 0
    boxes_per_image: int = 10

    def __post_init__(self) -> None:
        problems = []
        if unknown := [a for a in self.archs if a not in ARCHS]:
            problems.append(f"archs {unknown} (choose from {sorted(ARCHS)})")
        if unknown := [d for d in self.dtypes if d not in ("fp32", "bf16", "fp16")]:
            problems.append(f"dtypes {unknown} (choose from fp32, bf16, fp16)")
        if unknown := [m for m in self.models if m not in VARIANTS]:
            problems.append(f"models {unknown} (choose from {VARIANTS})")
        if unknown := [m for m in self.modes if m not in ("train", "infer")]:
            problems.append(f"modes {unknown} (choose from train, infer)")
        if self.memory not in MEMORY_METHODS:
            problems.append(f"memory {self.memory!r} (choose from {MEMORY_METHODS})")
        elif self.memory == "inprocess" and torch.device(self.device).type != "cuda":
            problems.append("memory 'inprocess' (CUDA only: on a CPU the peak of one model is only measurable in a "
                            "process of its own; use 'subprocess' or 'off')")
        if self.iters < 1 or self.repeats < 1 or self.warmup < 1 or self.train_batch < 1:
            problems.append(f"iters={self.iters}, repeats={self.repeats}, warmup={self.warmup} and "
                            f"train_batch={self.train_batch} must be >= 1")
        if any(b < 1 for b in self.infer_batches) or self.height < 1 or self.width < 1:
            problems.append(f"batch sizes {self.infer_batches} and the image size {self.height}x{self.width} must "
                            "be >= 1")
        if problems:
            raise ValueError("benchmark settings: bad " + "; ".join(problems))

    @property
    def memory_method(self) -> str:
        """The memory method in force: "subprocess", "inprocess" or "off"."""
        if self.memory != "auto":
            return self.memory
        return "inprocess" if torch.device(self.device).type == "cuda" else "subprocess"


@dataclass
class Result:
    """One measured (variant, arch, mode, dtype, batch) row.

    `ms_per_iter` is the median over repeats of each repeat's median call time; `ms_min`/`ms_max`
    the range of those repeat medians, `repeat_ms` all of them. `detections` counts the boxes per
    image of one inference call (None for training); `loss` is the summed loss of one training step.
    """

    model: str
    arch: str
    mode: str
    dtype: str
    batch: int
    height: int
    width: int
    channels_last: bool
    compile: bool
    static: bool
    ms_per_iter: float
    ms_min: float
    ms_max: float
    repeat_ms: list[float]
    images_per_s: float
    peak_mem_gib: float | None = None
    mem_method: str = "off"
    detections: list[int] | None = None
    loss: float | None = None

    @property
    def side(self) -> str:
        """"ours" or "torchvision"."""
        return "torchvision" if self.model.startswith("torchvision") else "ours"

    def settings(self) -> tuple:
        """What must be equal for a like-for-like comparison."""
        return (self.arch, self.mode, self.dtype, self.batch, self.height, self.width, self.channels_last,
                self.compile, self.static)


@dataclass
class Comparison:
    """ours / torchvision speed ratio (> 1: ours faster), from the per-repeat ratios."""

    kind: str  # "like for like" / "each at its best"
    arch: str
    mode: str
    dtype: str
    batch: int
    ours: str
    torchvision: str
    ratio: float
    ratio_min: float
    ratio_max: float
    repeat_ratios: list[float] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.kind}: {self.arch} {self.mode} {self.dtype} batch {self.batch}: {self.ours} / "
                f"{self.torchvision} = {self.ratio:.2f}x (repeats {self.ratio_min:.2f}-{self.ratio_max:.2f})")


# ------------------------------------------------------------------------------------------- models
def build_torchvision(arch: str, *, model_size: tuple[int, int] = (800, 1333), num_classes: int = 91) -> nn.Module:
    """torchvision's Faster R-CNN of `arch` (a key of `ARCHS`): frozen BN, 3 trainable stages, random weights."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(backbone_name=ARCHS[arch], weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    return FasterRCNN(backbone, num_classes=num_classes, min_size=model_size[0], max_size=model_size[1])


def build_ours(arch: str, *, model_size: tuple[int, int] = (800, 1333), num_classes: int = 91) -> nn.Module:
    """Our Faster R-CNN with torchvision's architecture and settings (`torchvision_spec`), the ResNet of
    `arch`, frozen BN, stem and res2 frozen (torchvision's 3 trainable stages)."""
    from detection.models import build_faster_rcnn, torchvision_spec

    spec = torchvision_spec("fasterrcnn_resnet50_fpn", num_classes=num_classes).replace(
        backbone_name=ARCHS[arch], backbone_freeze_at=2, input_min_size=(model_size[0],),
        input_max_size=model_size[1], input_test_min_size=model_size[0], input_test_max_size=model_size[1])
    return build_faster_rcnn(spec)


_CLASSIFIERS: dict[tuple, dict[str, torch.Tensor]] = {}


@torch.no_grad()
def spread_classifier(model: nn.Module, images: list[torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Gives torchvision's `model` a seeded classifier under which random features give varied classes and
    well-spread scores, as a trained detector's do; returns the new `box_predictor` state.

    Random box-head features share one large common component, so a random classifier scores every RoI
    alike (no detection at all, or the same class everywhere) and post-processing has little to do. Rows
    orthogonal to the mean feature (measured on `images`) remove that component.
    """
    feats: dict[str, torch.Tensor] = {}
    hook = model.roi_heads.box_head.register_forward_hook(lambda m, i, o: feats.__setitem__("x", o))
    was_training = model.training
    model.eval()
    model(images)
    model.train(was_training)
    hook.remove()
    mu = feats["x"].mean(0)
    g = torch.Generator().manual_seed(seed)
    pred = model.roi_heads.box_predictor
    w = torch.randn(pred.cls_score.weight.shape, generator=g)
    w -= (w @ mu)[:, None] * mu[None] / (mu @ mu).clamp(min=1e-12)
    # Logits with a standard deviation of 4 over the RoIs: a few classes per RoI above the 0.05 threshold.
    spread = (feats["x"] @ w.T).std().clamp(min=1e-12)
    pred.cls_score.weight.copy_(w * (4.0 / spread))
    pred.cls_score.bias.zero_()
    pred.bbox_pred.weight.copy_(torch.randn(pred.bbox_pred.weight.shape, generator=g) * 0.01)
    pred.bbox_pred.bias.zero_()
    return {k: v.clone() for k, v in pred.state_dict().items()}


def build_pair(arch: str, *, model_size: tuple[int, int] = (800, 1333), seed: int = 0,
               calibration: tuple[int, int] | None = None) -> tuple[nn.Module, nn.Module]:
    """`(ours, torchvision)` with the same weights: torchvision's seeded initialisation, loaded into ours.

    Sharing every weight gives both post-processings the same candidates, so neither model does less NMS
    or pooling work than the other. With `calibration=(H, W)`, the classifier is first set by
    `spread_classifier` on a seeded random image of that size (computed once per process and setting),
    so that post-processing has a trained detector's load (up to 100 detections per image).
    """
    from detection.convert import load_torchvision_detector

    torch.manual_seed(seed)
    tv = build_torchvision(arch, model_size=model_size)
    if calibration is not None:
        key = (arch, tuple(model_size), seed, tuple(calibration))
        if key not in _CLASSIFIERS:
            images, _ = make_inputs(1, *calibration, torch.device("cpu"), seed=seed + 1)
            _CLASSIFIERS[key] = spread_classifier(tv, images, seed)
        tv.roi_heads.box_predictor.load_state_dict(_CLASSIFIERS[key])
    ours = build_ours(arch, model_size=model_size)
    load_torchvision_detector(ours, tv.state_dict())
    return ours, tv


def make_inputs(batch: int, height: int, width: int, device: torch.device, boxes_per_image: int = 10,
                num_classes: int = 91, seed: int = 0) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Seeded random images `[3, H, W]` and targets (`boxes` xyxy absolute pixels, `labels`) on `device`."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=g).to(device))
        xy = torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3]) + 8
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, num_classes, (boxes_per_image,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def prepare(model: nn.Module, *, device: torch.device, channels_last: bool, compile_backbone: bool) -> nn.Module:
    """Moves `model` to `device`, optionally channels_last and with its backbone compiled; returns it."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if hasattr(model, "preprocessor"):
            model.preprocessor.channels_last = True
    if compile_backbone:
        model.backbone = torch.compile(model.backbone)
    return model


@dataclass
class _Variant:
    name: str
    model: nn.Module
    call: Callable[[list[torch.Tensor]], Any]
    channels_last: bool
    compile: bool
    static: bool = False


def _canvas(cfg: BenchConfig, model: nn.Module) -> tuple[int, int]:
    """The padded size the benchmark's images reach after the models' resize rule."""
    from detection.preprocess import resize_scale

    d = max(32, int(model.preprocessor.size_divisibility))
    s = resize_scale(cfg.height, cfg.width, *map(float, cfg.model_size))
    h, w = int(cfg.height * s), int(cfg.width * s)
    return -(-h // d) * d, -(-w // d) * d


def build_variants(arch: str, names: Sequence[str], cfg: BenchConfig, device: torch.device, dtype: str,
                   mode: str) -> list[_Variant]:
    """The variants `names` of `arch` that apply to `mode`, built on `device` with the same weights."""
    names = [n for n in names if mode == "infer" or n not in INFERENCE_ONLY]
    if not names:
        return []
    ours, tv = build_pair(arch, model_size=cfg.model_size, seed=cfg.seed, calibration=(cfg.height, cfg.width))
    out = []
    for name in names:
        if name in ("ours", "torchvision"):
            m = prepare(copy.deepcopy(ours if name == "ours" else tv), device=device, channels_last=cfg.channels_last,
                        compile_backbone=cfg.compile)
            out.append(_Variant(name, m, m, cfg.channels_last, cfg.compile))
        elif name == "torchvision-cl":
            m = prepare(copy.deepcopy(tv), device=device, channels_last=True, compile_backbone=cfg.compile)
            out.append(_Variant(name, m, m, True, cfg.compile))
        elif name == "ours-prepared":
            m = copy.deepcopy(ours).to(device).prepare_for_inference()
            m = prepare(m, device=device, channels_last=True, compile_backbone=cfg.compile)
            out.append(_Variant(name, m, m, True, cfg.compile))
        elif name == "ours-onnx":
            m = copy.deepcopy(ours).eval()
            out.append(_Variant(name, m, onnx_runner(m), False, False))
        elif name == "ours-static":
            from detection.static import StaticPredictor

            m = copy.deepcopy(ours).to(device).prepare_for_inference()
            predictor = StaticPredictor(m, canvas=_canvas(cfg, m), dtype=dtype, compile_backbone=cfg.compile)
            out.append(_Variant(name, m, predictor, True, cfg.compile, static=True))
        else:  # pragma: no cover - BenchConfig checks the names
            raise ValueError(f"unknown variant {name!r}")
    del ours, tv
    gc.collect()
    return out


def onnx_runner(model: nn.Module) -> Callable[[list[torch.Tensor]], list[dict[str, Any]]]:
    """`model` exported to ONNX (a temporary file) in one ONNX Runtime session with torch's thread count: a call
    takes the benchmark's float `[3, H, W]` images (converted to the graph's uint8 `(H, W, 3)` once per list) and
    returns one dict of numpy arrays per image."""
    import tempfile

    import onnxruntime as ort

    from detection.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    converted: dict[int, list[Any]] = {}

    def call(images: list[torch.Tensor]) -> list[dict[str, Any]]:
        arrays = converted.get(id(images))
        if arrays is None:
            arrays = [(img.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
                      .numpy() for img in images]
            converted.clear()
            converted[id(images)] = arrays
        return [dict(zip(names, session.run(None, {"image": a}))) for a in arrays]

    return call


# ------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    return autocast(device, "off" if dtype == "fp32" else dtype)


def interleaved_repeats(calls: dict[str, Callable[[], Any]], *, device: torch.device, iters: int,
                        repeats: int) -> dict[str, list[float]]:
    """Per call name, the median ms of each repeat. Within a repeat the calls alternate (A, B, A, B, ...),
    and the first call rotates from repeat to repeat (A first, then B, ...), so that a shared machine's
    slow and fast moments fall on every model alike."""
    names = list(calls)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(iters):
            for n in order:
                t = time.perf_counter()
                calls[n]()
                _sync(device)
                times[n].append(time.perf_counter() - t)
        for n in names:
            out[n].append(statistics.median(times[n]) * 1000)
    return out


def _train_step(model: nn.Module, images, targets, device: torch.device, dtype: str) -> Callable[[], torch.Tensor]:
    """A training step of `model` (forward, backward, SGD at lr 0) as a closure returning the summed loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # lr 0: the optimizer does all of its arithmetic, but random-weight models cannot diverge into NaN
    # boxes mid-benchmark (which would change the work done by NMS and pooling).
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")

    def step() -> torch.Tensor:
        with _autocast(device, dtype):
            losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()

    return step


def _infer_call(v: _Variant, images, device: torch.device, dtype: str) -> Callable[[], Any]:
    v.model.eval()

    def call() -> Any:
        with torch.inference_mode(), _autocast(device, dtype):
            return v.call(images)

    return call


def _cuda_peak(fn: Callable[[], Any], device: torch.device, base: int, shared_bytes: int) -> float:
    """GiB: peak allocated during one `fn()` above `base` (memory allocated before the model was built),
    plus the `shared_bytes` of inputs every model reads."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base + shared_bytes) / 2**30


def _tensor_bytes(images, targets=None) -> int:
    total = sum(i.numel() * i.element_size() for i in images)
    for t in targets or []:
        total += sum(v.numel() * v.element_size() for v in t.values())
    return total


# ------------------------------------------------------------------------------------------ memory
def _read_vmhwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_vmhwm() -> bool:
    """Resets the peak-RSS mark of this process (Linux >= 4.0); False when it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child process of `measure_memory_subprocess`: builds one variant as the parent does,
    warms it up, then measures the peak resident set of one more call. Returns a JSON-able dict."""
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
    torch.set_num_threads(spec["threads"])
    device = torch.device(cfg.device)
    (v,) = build_variants(spec["arch"], [spec["variant"]], cfg, device, spec["dtype"], spec["mode"])
    batch = spec["batch"]
    images, targets = make_inputs(batch, cfg.height, cfg.width, device, cfg.boxes_per_image, seed=cfg.seed)
    if spec["mode"] == "train":
        fn = _train_step(v.model, images, targets, device, spec["dtype"])
    else:
        fn = _infer_call(v, images, device, spec["dtype"])
    for _ in range(max(1, min(cfg.warmup, 2))):
        fn()
    gc.collect()
    if _reset_vmhwm():
        fn()
        peak, method = _read_vmhwm(), "subprocess VmHWM of one call after warm-up"
    else:  # whole-life peak of the child (build and warm-up included)
        fn()
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "subprocess ru_maxrss"
    return {"peak_mem_gib": peak / 2**30 if peak else None, "mem_method": method}


def measure_memory_subprocess(cfg: BenchConfig, arch: str, variant: str, mode: str, dtype: str, batch: int, *,
                              timeout: float = 1800.0) -> tuple[float | None, str]:
    """Peak memory (GiB) of one variant measured in a fresh Python process (same settings, threads and
    environment variables); `(None, reason)` when the child fails."""
    spec = {"config": asdict(cfg), "arch": arch, "variant": variant, "mode": mode, "dtype": dtype, "batch": batch,
            "threads": torch.get_num_threads()}
    code = ("import json, sys; from resnet_det.studies.benchmark import memory_child; "
            "print('RESULT ' + json.dumps(memory_child(json.loads(sys.stdin.read()))))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(spec), capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"subprocess timed out after {timeout:.0f} s"
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            got = json.loads(line[len("RESULT "):])
            return got["peak_mem_gib"], got["mem_method"]
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"subprocess failed (exit {proc.returncode}): {tail[:200]}"


# --------------------------------------------------------------------------------------------- run
def _measure(cfg: BenchConfig, arch: str, dtype: str, mode: str, batch: int, device: torch.device,
             log: Callable[[str], None], failures: list[dict[str, str]] | None = None) -> list[Result]:
    """Builds the variants of one (arch, dtype, mode, batch), warms each up, times them interleaved.

    A variant that fails to build or to run its warm-up is logged and listed in `failures` (the others are
    still measured), so that one unsupported setting does not cost a whole run's figures."""
    images, targets = make_inputs(batch, cfg.height, cfg.width, device, cfg.boxes_per_image, seed=cfg.seed)
    shared = _tensor_bytes(images, targets if mode == "train" else None)
    cuda_mem = device.type == "cuda" and cfg.memory_method == "inprocess"
    variants, calls, peaks, dets, losses = [], {}, {}, {}, {}
    for name in [n for n in cfg.models if (mode == "infer" or n not in INFERENCE_ONLY)
                 and (dtype == "fp32" or n not in FP32_ONLY)]:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device) if cuda_mem else 0
        try:
            (v,) = build_variants(arch, [name], cfg, device, dtype, mode)
            fn = (_train_step(v.model, images, targets, device, dtype) if mode == "train"
                  else _infer_call(v, images, device, dtype))
            out = None
            for _ in range(cfg.warmup):
                out = fn()
            _sync(device)
        except Exception as e:  # reported, and the other variants still run
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
            log(f"{name:<15} {arch:<9} {mode:<6} {dtype:<5} {batch:>5} FAILED: {message}")
            if failures is not None:
                failures.append({"model": name, "arch": arch, "mode": mode, "dtype": dtype, "batch": str(batch),
                                 "error": message})
            continue
        if mode == "train":
            losses[name] = float(out)
        else:
            dets[name] = [int(o["boxes"].shape[0]) for o in out]
        if cuda_mem:
            peaks[name] = (_cuda_peak(fn, device, base, shared), "cuda max_memory_allocated of one call, own "
                                                                 "allocations + inputs")
        variants.append(v)
        calls[name] = fn
    timed = interleaved_repeats(calls, device=device, iters=cfg.iters, repeats=cfg.repeats)
    results = []
    for v in variants:
        reps = timed[v.name]
        ms = statistics.median(reps)
        peak, method = peaks.get(v.name, (None, "off"))
        results.append(Result(v.name, arch, mode, dtype, batch, cfg.height, cfg.width, v.channels_last, v.compile,
                              v.static, ms, min(reps), max(reps), [round(r, 3) for r in reps], batch * 1000 / ms,
                              peak, method, dets.get(v.name), losses.get(v.name)))
    del variants, calls
    gc.collect()
    if cfg.memory_method == "subprocess":
        for r in results:
            r.peak_mem_gib, r.mem_method = measure_memory_subprocess(cfg, arch, r.model, mode, dtype, batch)
    for r in results:
        log(format_row(r))
    return results


def config_from_settings(*, archs: Sequence[str], dtypes: Sequence[str], device: str, height: int, width: int,
                         train_batch: int, infer_batches: Sequence[int], iters: int, warmup: int, channels_last: bool,
                         compile_backbone: bool, which: Sequence[str], modes: Sequence[str], prepared: bool = False,
                         repeats: int = 3, memory: str = "auto", **more: Any) -> BenchConfig:
    """A `BenchConfig` from the keyword settings of `run` (the command line's names; `which` are the
    variants, `prepared` adds "ours-prepared"). Raises `ValueError` naming every bad setting."""
    models = tuple(dict.fromkeys([*which, *(["ours-prepared"] if prepared else [])]))
    return BenchConfig(archs=tuple(archs), dtypes=tuple(dtypes), device=device, height=height, width=width,
                       train_batch=train_batch, infer_batches=tuple(infer_batches), iters=iters, warmup=warmup,
                       repeats=repeats, channels_last=channels_last, compile=compile_backbone, models=models,
                       modes=tuple(modes), memory=memory, **more)


def run(config: BenchConfig | None = None, *, log: Callable[[str], None] = print,
        failures: list[dict[str, str]] | None = None, **settings: Any) -> list[Result]:
    """Measures every (arch, dtype, mode, batch) of `config` (or of `config_from_settings(**settings)`);
    returns the rows (also logged as they come). Variants that fail are logged and appended to `failures`."""
    cfg = config if config is not None else config_from_settings(**settings)
    device = torch.device(cfg.device)
    results: list[Result] = []
    for arch in cfg.archs:
        for dtype in cfg.dtypes:
            if "train" in cfg.modes:
                results += _measure(cfg, arch, dtype, "train", cfg.train_batch, device, log, failures)
            if "infer" in cfg.modes:
                for b in cfg.infer_batches:
                    results += _measure(cfg, arch, dtype, "infer", b, device, log, failures)
    return results


# ------------------------------------------------------------------------------------------ report
HEADER = (f"{'model':<15} {'arch':<9} {'mode':<6} {'dtype':<5} {'batch':>5} {'size':>10} {'cl':>3} {'comp':>4} "
          f"{'stat':>4} {'ms/iter':>9} {'min-max ms':>17} {'img/s':>8} {'peak GiB':>9} detections")


def format_row(r: Result) -> str:
    """One table row under `HEADER`."""
    mem = f"{r.peak_mem_gib:.2f}" if r.peak_mem_gib is not None else "n/a"
    yn = lambda b: "y" if b else "n"  # noqa: E731
    dets = "" if r.detections is None else ",".join(map(str, r.detections))
    if r.loss is not None:
        dets = f"loss {r.loss:.4f}"
    return (f"{r.model:<15} {r.arch:<9} {r.mode:<6} {r.dtype:<5} {r.batch:>5} {f'{r.height}x{r.width}':>10} "
            f"{yn(r.channels_last):>3} {yn(r.compile):>4} {yn(r.static):>4} {r.ms_per_iter:>9.1f} "
            f"{f'{r.ms_min:.1f}-{r.ms_max:.1f}':>17} {r.images_per_s:>8.2f} {mem:>9} {dets}")


def _ratio(ours: Result, tv: Result, kind: str) -> Comparison:
    per = [t / o for o, t in zip(ours.repeat_ms, tv.repeat_ms)] or [tv.ms_per_iter / ours.ms_per_iter]
    return Comparison(kind, ours.arch, ours.mode, ours.dtype, ours.batch, ours.model, tv.model,
                      statistics.median(per), min(per), max(per), [round(p, 4) for p in per])


def comparisons(results: Sequence[Result]) -> list[Comparison]:
    """ours / torchvision ratios: "like for like" for every pair of rows with equal settings, and "each at
    its best" (the fastest row of each side for an arch, mode, dtype, batch and size) where that pair is not
    already a like-for-like one."""
    out = []
    tv_rows = [r for r in results if r.side == "torchvision"]
    for r in results:
        if r.side == "ours":
            out += [_ratio(r, t, "like for like") for t in tv_rows if t.settings() == r.settings()]
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.arch, r.mode, r.dtype, r.batch, r.height, r.width), []).append(r)
    for rows in groups.values():
        ours = [r for r in rows if r.side == "ours"]
        tv = [r for r in rows if r.side == "torchvision"]
        if ours and tv:
            best_o = min(ours, key=lambda r: r.ms_per_iter)
            best_t = min(tv, key=lambda r: r.ms_per_iter)
            if best_o.settings() != best_t.settings():
                out.append(_ratio(best_o, best_t, "each at its best"))
    return out


def speedups(results: Sequence[Result]) -> list[str]:
    """The lines of `comparisons`."""
    return [c.line() for c in comparisons(results)]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command() -> str:
    """The command line as typed: `resnet-det benchmark ...`, `python -m resnet_det benchmark ...`."""
    if not sys.argv or not sys.argv[0]:
        return ""
    head = Path(sys.argv[0])
    words = ["python", "-m", head.parent.name] if head.name == "__main__.py" else [head.name]
    return shlex.join([*words, *sys.argv[1:]])


def environment(device: str) -> dict[str, Any]:
    """What the figures were measured on and with: versions, device, threads, speed-relevant variables."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "device": device, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    if hasattr(os, "sched_getaffinity"):
        env["cpu_affinity"] = len(os.sched_getaffinity(0))
    for pkg in ("torchvision", "onnxruntime", "resnet-det"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[pkg] = importlib.metadata.version(pkg)
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        env["gpu"] = torch.cuda.get_device_name(index)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    env["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    env["env"] = {k: v for k, v in sorted(os.environ.items())
                  if k in ENV_NAMES or any(k.startswith(p) for p in ENV_PREFIXES)}
    return env


def write_json(results: Sequence[Result], path: str | Path, env: dict[str, Any],
               config: BenchConfig | None = None, failures: Sequence[dict[str, str]] = ()) -> Path:
    """Writes the environment, the settings, the rows, the comparisons and the failed variants as JSON;
    returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in results:
        d = asdict(r)
        d["side"] = r.side
        rows.append(d)
    data = {"environment": env, "config": asdict(config) if config is not None else None, "results": rows,
            "comparisons": [asdict(c) for c in comparisons(results)], "speedups": speedups(results),
            "failures": list(failures)}
    path.write_text(json.dumps(data, indent=2))
    return path


def result_from_dict(d: dict[str, Any]) -> Result:
    """A `Result` back from its JSON form."""
    return Result(**{f.name: d[f.name] for f in fields(Result) if f.name in d})
