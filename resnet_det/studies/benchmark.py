"""Speed and memory of our Faster R-CNN against torchvision's, same process, same inputs.

Measures training images/s (forward + backward + SGD step), inference latency at batch 1 and
images/s at batch 8, and peak memory (CUDA: `max_memory_allocated`; CPU: peak RSS growth), for fp32,
bf16 and fp16 autocast, optionally with channels_last and `torch.compile` of the backbone (applied
to both models alike).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet_det.common import autocast

ARCHS = {"R50-FPN": "resnet50", "R101-FPN": "resnet101", "R18-FPN": "resnet18"}


@dataclass
class Result:
    model: str  # "ours" / "torchvision"
    arch: str
    mode: str  # "train" / "infer"
    dtype: str
    batch: int
    height: int
    width: int
    channels_last: bool
    compile: bool
    ms_per_iter: float
    images_per_s: float
    peak_mem_gib: float | None


def build_ours(arch: str, num_classes: int = 91) -> nn.Module:
    """Our Faster R-CNN of `arch` (a key of `ARCHS`) in torchvision's setting, random weights."""
    from detection.models import build_faster_rcnn

    # torchvision's configuration: frozen BN, 3 trainable stages (freeze stem + res2).
    return build_faster_rcnn(num_classes=num_classes, backbone_name=ARCHS[arch], backbone_norm="FrozenBN",
                             backbone_freeze_at=2, input_min_size=(800,), input_max_size=1333,
                             input_test_min_size=800, input_test_max_size=1333)


def build_torchvision(arch: str, num_classes: int = 91) -> nn.Module:
    """torchvision's Faster R-CNN of `arch` (a key of `ARCHS`), random weights, 3 trainable stages."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(backbone_name=ARCHS[arch], weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    return FasterRCNN(backbone, num_classes=num_classes, min_size=800, max_size=1333)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    return autocast(device, "off" if dtype == "fp32" else dtype)


def _peak_reset(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_read(device: torch.device, start: int) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    return grown / 2**20 if grown > 0 else None  # KiB -> GiB; RSS only grows, so this is a lower bound


def _time(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


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


def bench_train(model: nn.Module, images, targets, *, device: torch.device, dtype: str, iters: int,
                warmup: int) -> tuple[float, float | None]:
    """Median ms of a training step (forward, backward, SGD at lr 0) and the peak memory in GiB."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # lr 0: the optimizer does all of its arithmetic, but random-weight models cannot diverge into NaN
    # boxes mid-benchmark (which would change the work done by NMS and pooling).
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")

    def step() -> None:
        with _autocast(device, dtype):
            losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    start = _peak_reset(device)
    ms = _time(step, device, iters, warmup)
    return ms, _peak_read(device, start)


@torch.no_grad()
def bench_infer_interleaved(models: dict[str, nn.Module], images, *, device: torch.device, dtype: str, iters: int,
                            warmup: int) -> dict[str, tuple[float, float | None]]:
    """Inference ms (median) and peak memory of each model, the timed calls taken in turn (A, B, A, B...).

    Interleaving spreads a shared machine's slow and fast moments over every model alike; measured one
    after the other, two models' figures on a 2-core VM differed by up to 20% between identical runs.
    """
    for m in models.values():
        m.eval()

    def step(m: nn.Module) -> None:
        with _autocast(device, dtype):
            m(images)

    peaks: dict[str, float | None] = {}
    for name, m in models.items():  # the first warm-up call of each model also measures its peak memory
        start = _peak_reset(device)
        step(m)
        _sync(device)
        peaks[name] = _peak_read(device, start)
        for _ in range(warmup - 1):
            step(m)
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(iters):
        for name, m in models.items():
            t = time.perf_counter()
            step(m)
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: (statistics.median(ts) * 1000, peaks[name]) for name, ts in times.items()}


def run(*, archs: list[str], dtypes: list[str], device: str, height: int, width: int, train_batch: int,
        infer_batches: list[int], iters: int, warmup: int, channels_last: bool, compile_backbone: bool,
        which: list[str], modes: list[str], prepared: bool = False,
        log: Callable[[str], None] = print) -> list[Result]:
    """Run every (arch, model, dtype, mode) combination; returns the results (also logged as they come).

    Training is measured model after model; inference calls of all models are interleaved (see
    `bench_infer_interleaved`). With `prepared`, inference is also measured for "ours-prepared": our model after
    `prepare_for_inference()` (frozen BN folded into the convolutions, channels_last), the way this
    project ships a trained model for inference.
    """
    dev = torch.device(device)
    results: list[Result] = []
    for arch in archs:
        for dtype in dtypes:
            variants: dict[str, nn.Module] = {}
            for name in which:
                torch.manual_seed(0)
                model = build_ours(arch) if name == "ours" else build_torchvision(arch)
                model = prepare(model, device=dev, channels_last=channels_last, compile_backbone=compile_backbone)
                if "train" in modes:
                    images, targets = make_inputs(train_batch, height, width, dev)
                    ms, mem = bench_train(model, images, targets, device=dev, dtype=dtype, iters=iters, warmup=warmup)
                    results.append(Result(name, arch, "train", dtype, train_batch, height, width, channels_last,
                                          compile_backbone, ms, train_batch * 1000 / ms, mem))
                    log(format_row(results[-1]))
                if "infer" in modes:
                    variants[name] = model
                    if prepared and name == "ours":
                        variants["ours-prepared"] = copy.deepcopy(model).prepare_for_inference()
                else:
                    del model
                gc.collect()
            for b in infer_batches if variants else []:
                images, _ = make_inputs(b, height, width, dev)
                timed = bench_infer_interleaved(variants, images, device=dev, dtype=dtype, iters=iters, warmup=warmup)
                for label, (ms, mem) in timed.items():
                    # ("ours-prepared" is channels_last internally; the column shows the run's flag.)
                    results.append(Result(label, arch, "infer", dtype, b, height, width, channels_last,
                                          compile_backbone, ms, b * 1000 / ms, mem))
                    log(format_row(results[-1]))
            variants.clear()
            gc.collect()
    return results


HEADER = (f"{'model':<12} {'arch':<9} {'mode':<6} {'dtype':<5} {'batch':>5} {'size':>10} {'cl':>3} {'comp':>4} "
          f"{'ms/iter':>9} {'img/s':>8} {'peak GiB':>9}")


def format_row(r: Result) -> str:
    """One table row under `HEADER`."""
    mem = f"{r.peak_mem_gib:.2f}" if r.peak_mem_gib is not None else "n/a"
    return (f"{r.model:<12} {r.arch:<9} {r.mode:<6} {r.dtype:<5} {r.batch:>5} {f'{r.height}x{r.width}':>10} "
            f"{'y' if r.channels_last else 'n':>3} {'y' if r.compile else 'n':>4} {r.ms_per_iter:>9.1f} "
            f"{r.images_per_s:>8.2f} {mem:>9}")


def speedups(results: list[Result]) -> list[str]:
    """Lines "ours / torchvision" for every setting measured for both."""
    lines = []
    key = lambda r: (r.arch, r.mode, r.dtype, r.batch, r.height, r.width, r.channels_last, r.compile)  # noqa: E731
    tv = {key(r): r for r in results if r.model == "torchvision"}
    for r in results:
        if r.model.startswith("ours") and key(r) in tv:
            lines.append(f"{r.arch} {r.mode} {r.dtype} batch {r.batch}: {r.model}/torchvision images/s = "
                         f"{r.images_per_s / tv[key(r)].images_per_s:.2f}x")
    return lines


def environment(device: str) -> dict[str, str]:
    """Versions and hardware the numbers were measured on (GPU name, or CPU threads)."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "device": device}
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    else:
        env["cpu_threads"] = str(torch.get_num_threads())
    return env


def write_json(results: list[Result], path: str | Path, env: dict[str, str]) -> Path:
    """Writes the environment, the rows and the speed-ups as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "results": [asdict(r) for r in results],
                                "speedups": speedups(results)}, indent=2))
    return path
