"""The ResNet paper's degradation study on CIFAR-10 (He et al. 2015, section 4.2, Fig. 6 and Table 6).

Plain nets get *worse* with depth (plain-56 has a higher training error than plain-20); ResNets of the
same depths get better. `run_degradation_study` trains the CIFAR-style nets of `backbone.resnet` with the
paper's recipe (SGD 0.1, momentum 0.9, weight decay 1e-4, batch 128, lr / 10 at 32k and 48k of 64k
iterations, 4-pixel pad + random crop + flip, per-pixel mean subtraction) and writes the curves and a
table next to the paper's figures. CLI: `resnet-det degradation-study` (`tools/degradation_study.py`).

Data: CIFAR-10 from a local folder (`cifar-10-batches-bin/`, read without pickle, or the python
`cifar-10-batches-py/`), never downloaded here; or `synthetic`, a small deterministic 10-class set for
smoke runs (no substitute for CIFAR-10, although a one-minute CPU run at depths 8 and 20 already shows
plain-20 training worse than plain-8 and ResNet-20 better than ResNet-8).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbone.applications import ImageClassifier
from backbone.resnet import CifarResNet
from resnet_det_common import atomic_write, autocast, progress_bar

logger = logging.getLogger(__name__)

# Table 6 of the paper: CIFAR-10 test error (%) of the ResNets (plain nets are only plotted, Fig. 6).
PAPER_TEST_ERROR = {"resnet20": 8.75, "resnet32": 7.51, "resnet44": 7.17, "resnet56": 6.97, "resnet110": 6.43}
CIFAR_CLASSES = 10


@dataclass
class StudyConfig:
    """Recipe of section 4.2. `iterations` scales the schedule: milestones at 50% and 75%."""

    depths: tuple[int, ...] = (20, 56)
    kinds: tuple[str, ...] = ("plain", "resnet")
    iterations: int = 64_000
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_lr: float = 0.01       # the paper's warm-up for the 110-layer net
    warmup_iters: int = 400       # ... until training error < 80% (about 400 iterations)
    warmup_min_depth: int = 110
    eval_period: int = 2000
    checkpoint_period: int = 2000
    amp: str = "off"              # off | bf16 | fp16
    channels_last: bool = False
    seed: int = 0
    milestones: tuple[float, ...] = field(default=(0.5, 0.75))

    def __post_init__(self) -> None:
        for d in self.depths:
            if not isinstance(d, int) or d < 8 or (d - 2) % 6:
                raise ValueError(f"depths: {d!r} is not of the form 6n+2 (20, 32, 44, 56, 110, ...)")
        bad = [k for k in self.kinds if k not in ("plain", "resnet")]
        if bad or not self.kinds:
            raise ValueError(f"kinds: {list(self.kinds)!r}; allowed: 'plain', 'resnet'")
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp={self.amp!r}; allowed: 'off', 'bf16', 'fp16'")
        for name in ("iterations", "batch_size", "eval_period", "checkpoint_period"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------------- data
def _read_bin_batches(folder: Path, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary format: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32)."""
    images, labels = [], []
    for name in names:
        path = folder / name
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % 3073:
            raise ValueError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte CIFAR-10 records "
                             "(1 label byte + 32x32x3 pixels); is the file truncated?")
        rec = raw.reshape(-1, 3073)
        labels.append(rec[:, 0].astype(np.int64))
        images.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


def load_cifar10(root: str | os.PathLike) -> dict[str, tuple[Tensor, Tensor]]:
    """`{"train": (uint8 N x 3 x 32 x 32, int64 N), "test": ...}` from a local CIFAR-10 copy.

    `root` is the folder holding `cifar-10-batches-bin/` or `cifar-10-batches-py/` (or one of them).
    """
    root = Path(root)
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    for folder in (root / "cifar-10-batches-bin", root):
        if (folder / "test_batch.bin").is_file():
            missing = [n for n in train_names if not (folder / f"{n}.bin").is_file()]
            if missing:
                raise FileNotFoundError(f"{folder}: missing {', '.join(m + '.bin' for m in missing)}")
            tr = _read_bin_batches(folder, [f"{n}.bin" for n in train_names])
            te = _read_bin_batches(folder, ["test_batch.bin"])
            break
    else:
        py = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        if not (py / "test_batch").is_file():
            raise FileNotFoundError(
                f"no CIFAR-10 under {root}: expected cifar-10-batches-bin/ (data_batch_1..5.bin, test_batch.bin) "
                "or cifar-10-batches-py/ (data_batch_1..5, test_batch). Get it from "
                "https://www.cs.toronto.edu/~kriz/cifar.html and extract it there, or use data=synthetic.")
        from torchvision.datasets import CIFAR10  # the python format is pickled; torchvision reads it

        out = {}
        for split, train in (("train", True), ("test", False)):
            ds = CIFAR10(str(py.parent), train=train, download=False)
            out[split] = (np.asarray(ds.data).transpose(0, 3, 1, 2), np.asarray(ds.targets, dtype=np.int64))
        tr, te = out["train"], out["test"]
    result = {}
    for split, (x, y) in (("train", tr), ("test", te)):
        if y.min() < 0 or y.max() >= CIFAR_CLASSES:
            raise ValueError(f"{root}: {split} labels outside 0..9 (min {y.min()}, max {y.max()})")
        result[split] = (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))
    return result


def synthetic_cifar(num_train: int = 2000, num_test: int = 500, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """A deterministic 10-class 32x32 set: oriented colour gratings under noise (class = orientation x colour)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def make(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, CIFAR_CLASSES, (n,), generator=g)
        angle = (labels % 5).float() * (math.pi / 5) + 0.15 * torch.randn(n, generator=g)
        freq = 0.35 + 0.1 * torch.rand(n, generator=g)
        phase = 2 * math.pi * torch.rand(n, generator=g)
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        wave = torch.sin(freq[:, None, None] * (xx * cos + yy * sin) + phase[:, None, None])
        colour = torch.where((labels >= 5)[:, None], torch.tensor([0.9, 0.3, 0.2]), torch.tensor([0.2, 0.4, 0.9]))
        img = 0.5 + 0.4 * wave[:, None] * colour[:, :, None, None] + 0.15 * torch.randn(n, 3, 32, 32, generator=g)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels

    return {"train": make(num_train), "test": make(num_test)}


def augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The paper's augmentation, batched: pad 4 (zeros), random 32x32 crop, horizontal flip with p=0.5."""
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dev = x.device
    oy = torch.randint(0, 9, (n,), generator=generator).to(dev)
    ox = torch.randint(0, 9, (n,), generator=generator).to(dev)
    flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
    rows = oy[:, None] + torch.arange(h, device=dev)
    cols = ox[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=dev)[:, None, None, None]
    idx_c = torch.arange(c, device=dev)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


# ---------------------------------------------------------------------------------------------------- model
def build_cifar_classifier(kind: str, depth: int) -> ImageClassifier:
    """CIFAR-style ResNet (option A shortcuts) or its plain twin, with global average pooling and a 10-way fc."""
    body = CifarResNet(depth, out_features=("res4",), shortcut=(kind == "resnet"))
    return ImageClassifier(body, classes=CIFAR_CLASSES, input_shape=(3, 32, 32))


def lr_at(cfg: StudyConfig, depth: int, it: int) -> float:
    """Learning rate at iteration `it`: the warm-up for the deepest nets, then / 10 at each milestone."""
    if depth >= cfg.warmup_min_depth and it < cfg.warmup_iters:
        return cfg.warmup_lr
    drops = sum(it >= round(m * cfg.iterations) for m in cfg.milestones)
    return cfg.lr * 0.1**drops


@torch.no_grad()
def evaluate_error(model: nn.Module, x: Tensor, y: Tensor, mean: Tensor, *, batch_size: int = 500,
                   amp: str = "off", channels_last: bool = False) -> float:
    """Top-1 error (%) of `model` on uint8 images `x`."""
    model.eval()
    dev = mean.device
    wrong = 0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(dev).float().div_(255).sub_(mean)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(dev, amp):
            pred = model(xb).argmax(1)
        wrong += int((pred != y[i:i + batch_size].to(dev)).sum())
    model.train()
    return 100.0 * wrong / max(len(x), 1)


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def train_one(kind: str, depth: int, data: dict[str, tuple[Tensor, Tensor]], cfg: StudyConfig, out_dir: Path,
              device: torch.device, progress: bool = True) -> dict[str, Any]:
    """Train one net; curves go to `metrics.jsonl`, the final figures to `result.json`. Resumes from
    `checkpoint.pt` (written atomically every `checkpoint_period` iterations)."""
    name = f"{kind}{depth}"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_cifar_classifier(kind, depth).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # weight decay on every weight, as the paper (and its Caffe/Torch code) did
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    mean = x_train.float().div(255).mean(0, keepdim=True).to(device)  # per-pixel mean, as in the paper
    g = torch.Generator().manual_seed(cfg.seed)
    start, order, pos = 0, torch.randperm(len(x_train), generator=g), 0
    ckpt_path = out_dir / "checkpoint.pt"
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, order, pos = int(state["iteration"]), state["order"], int(state["pos"])
        g.set_state(state["generator"])
        logger.info("%s: resumed at iteration %d", name, start)
    metrics = (out_dir / "metrics.jsonl").open("a")
    x_dev, y_dev = x_train.to(device), y_train.to(device)
    running_wrong, running_n, t0 = 0, 0, time.perf_counter()
    with progress_bar(total=cfg.iterations, initial=start, desc=name, enabled=progress) as bar:
        for it in range(start, cfg.iterations):
            if pos + cfg.batch_size > len(order):
                order, pos = torch.randperm(len(x_train), generator=g), 0
            idx = order[pos:pos + cfg.batch_size].to(device)
            pos += cfg.batch_size
            xb = augment(x_dev[idx], g).float().div_(255).sub_(mean)
            yb = y_dev[idx]
            if cfg.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            lr = lr_at(cfg, depth, it)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast(device, cfg.amp):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: non-finite loss {loss.item()} at iteration {it} (lr {lr}); "
                                         "try amp=off or a warm-up (warmup_min_depth)")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            running_wrong += int((logits.argmax(1) != yb).sum())
            running_n += len(yb)
            done = it + 1
            if done % cfg.eval_period == 0 or done == cfg.iterations:
                rec = {"iteration": done, "lr": lr, "loss": loss.item(),
                       "train_error": 100.0 * running_wrong / running_n,
                       "test_error": evaluate_error(model, x_test, y_test, mean, amp=cfg.amp,
                                                    channels_last=cfg.channels_last),
                       "time": time.perf_counter() - t0}
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                logger.info("%s: iteration %d/%d, train error %.1f%%, test error %.1f%%", name, done, cfg.iterations,
                            rec["train_error"], rec["test_error"])
                running_wrong, running_n = 0, 0
            if bar is not None:
                bar.update(1)
            if done % cfg.checkpoint_period == 0 and done < cfg.iterations:
                _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                              "iteration": done, "order": order, "pos": pos, "generator": g.get_state()}, ckpt_path)
    metrics.close()
    curve = read_curve(out_dir / "metrics.jsonl")
    result = {"name": name, "kind": kind, "depth": depth, "params": sum(p.numel() for p in model.parameters()),
              "final_train_error": curve[-1]["train_error"], "final_test_error": curve[-1]["test_error"],
              "iterations": cfg.iterations}
    atomic_write(out_dir / "result.json", json.dumps(result, indent=2))
    ckpt_path.unlink(missing_ok=True)
    return result


def read_curve(path: Path) -> list[dict[str, Any]]:
    """The metrics records, keeping only the last one per iteration (a resumed run rewrites some)."""
    recs: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            recs[int(rec["iteration"])] = rec
    return [recs[k] for k in sorted(recs)]


# ---------------------------------------------------------------------------------------------- reporting
def summarize(results: Sequence[dict[str, Any]], *, with_paper: bool = True) -> dict[str, Any]:
    """Rows next to the paper's Table 6 (CIFAR-10 runs only), and whether plain nets degrade and ResNets
    improve with depth."""
    rows = [{**r, "paper_test_error": PAPER_TEST_ERROR.get(r["name"]) if with_paper else None} for r in results]
    out: dict[str, Any] = {"rows": rows}
    for kind in ("plain", "resnet"):
        rs = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["depth"])
        if len(rs) >= 2:
            shallow, deep = rs[0], rs[-1]
            out[f"{kind}_deeper_minus_shallower_train_error"] = deep["final_train_error"] - shallow["final_train_error"]
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (with the paper's Table 6 test errors) and its verdict lines."""
    lines = ["| net | params | train error (%) | test error (%) | paper test error (%) |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        paper = f"{r['paper_test_error']:.2f}" if r.get("paper_test_error") is not None else "-"
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['final_train_error']:.2f} | "
                     f"{r['final_test_error']:.2f} | {paper} |")
    words = {"plain": "degradation (paper: plain-56 > plain-20)", "resnet": "ResNet (paper: deeper is better)"}
    for kind, word in words.items():
        key = f"{kind}_deeper_minus_shallower_train_error"
        if key in summary:
            lines.append(f"\n{word}: deepest minus shallowest training error {summary[key]:+.2f} points")
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path, dataset: str = "CIFAR-10") -> None:
    """Fig. 6 of the paper: plain nets left, ResNets right; training error dashed, test error solid."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = {"plain": fig.add_subplot(121), "resnet": fig.add_subplot(122)}
    for name, curve in curves.items():
        kind = "plain" if name.startswith("plain") else "resnet"
        ax = axes[kind]
        its = [r["iteration"] for r in curve]
        (line,) = ax.plot(its, [r["train_error"] for r in curve], "--", linewidth=1)
        ax.plot(its, [r["test_error"] for r in curve], "-", color=line.get_color(), linewidth=2, label=name)
    for kind, ax in axes.items():
        ax.set_title(f"{kind} nets on {dataset} (dashed: training error, solid: test error)", fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("error (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_degradation_study(data: str | os.PathLike, cfg: StudyConfig, output_dir: str | os.PathLike,
                          device: str | torch.device | None = None, progress: bool = True) -> dict[str, Any]:
    """Train every (kind, depth) of `cfg`, skipping nets whose `result.json` exists (resume), and write
    `study.json`, `study.md` and `study.png` into `output_dir`."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.amp == "fp16" and dev.type == "cpu":
        raise ValueError("amp='fp16' needs a GPU; use amp='bf16' or 'off' on the CPU")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = synthetic_cifar(seed=cfg.seed) if str(data) == "synthetic" else load_cifar10(data)
    if cfg.batch_size > len(dataset["train"][1]):
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {len(dataset['train'][1])} training "
                         f"images of {data}; lower batch_size")
    (out / "config.json").write_text(json.dumps({"data": str(data), **asdict(cfg)}, indent=2))
    results, curves = [], {}
    for kind in cfg.kinds:
        for depth in cfg.depths:
            sub = out / f"{kind}{depth}"
            if (sub / "result.json").is_file():
                res = json.loads((sub / "result.json").read_text())
                logger.info("%s: already trained (%s), skipped", res["name"], sub / "result.json")
            else:
                res = train_one(kind, depth, dataset, cfg, sub, dev, progress=progress)
            results.append(res)
            curves[res["name"]] = read_curve(sub / "metrics.jsonl")
    summary = summarize(results, with_paper=str(data) != "synthetic")
    (out / "study.json").write_text(json.dumps(summary, indent=2))
    table = format_table(summary)
    (out / "study.md").write_text(table + "\n")
    plot_curves(curves, out / "study.png", dataset="synthetic data" if str(data) == "synthetic" else "CIFAR-10")
    print(table)
    return summary


__all__ = ["PAPER_TEST_ERROR", "StudyConfig", "augment", "build_cifar_classifier", "load_cifar10", "lr_at",
           "run_degradation_study", "summarize", "synthetic_cifar"]
