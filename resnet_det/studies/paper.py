"""The ResNet paper's backbone swap in Faster R-CNN (Table 8): VGG-16 vs ResNet-101, one command.

Trains and evaluates both configs (which differ in one line, the backbone), then writes a table
and a bar chart next to the paper's figures: COCO val mAP@[.5:.95] 21.2 -> 27.2 (+28% relative).
CLI: `resnet-det paper-study data.root=/path/to/coco` (`tools/paper_study.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from resnet_det.config import load_config
from resnet_det.config_files import resolve_config
from resnet_det_common import atomic_write, is_main_process, log_report

logger = logging.getLogger(__name__)

PAPER = {"vgg16": {"AP": 0.212, "AP50": 0.415}, "resnet101": {"AP": 0.272, "AP50": 0.484}}
# Shipped config names (resnet-det configs); files work too.
CONFIGS = ("paper/faster_rcnn_VGG16_C4", "paper/faster_rcnn_R_101_C4")


def _backbone_name(cfg: Any) -> str:
    """The backbone's registry name (``model.backbone.name``)."""
    return str(cfg.model.backbone.name)


def summarize(results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Table rows and the relative gain of the second backbone over the first, ours and the paper's."""
    names = list(results)
    rows = []
    for name in names:
        paper = PAPER.get(name, {})
        rows.append({"backbone": name, "AP": results[name].get("AP"), "AP50": results[name].get("AP50"),
                     "paper_AP": paper.get("AP"), "paper_AP50": paper.get("AP50")})
    out: dict[str, Any] = {"rows": rows}
    if len(names) == 2:
        a, b = (results[n].get("AP") for n in names)
        if a and b is not None:
            out["relative_gain"] = (b - a) / a
        pa, pb = PAPER.get(names[0], {}).get("AP"), PAPER.get(names[1], {}).get("AP")
        if pa and pb:
            out["paper_relative_gain"] = (pb - pa) / pa
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table beside the paper's figures, and the relative gains."""
    def f(v: float | None) -> str:
        return f"{100 * v:.1f}" if isinstance(v, float | int) else "-"

    lines = ["| backbone | mAP@[.5:.95] | mAP@.5 | paper mAP@[.5:.95] | paper mAP@.5 |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['backbone']} | {f(r['AP'])} | {f(r['AP50'])} | {f(r['paper_AP'])} | {f(r['paper_AP50'])} |")
    if "relative_gain" in summary:
        lines.append(f"\nrelative gain: ours {100 * summary['relative_gain']:+.1f}%, paper "
                     f"{100 * summary.get('paper_relative_gain', float('nan')):+.1f}%")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    """Bar chart of mAP@[.5:.95] per backbone, this run next to the paper, saved to `path`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(111)
    names = [r["backbone"] for r in summary["rows"]]
    xs = range(len(names))
    ours = [100 * (r["AP"] or 0) for r in summary["rows"]]
    paper = [100 * (r["paper_AP"] or 0) for r in summary["rows"]]
    ax.bar([x - 0.2 for x in xs], ours, width=0.4, label="this run")
    ax.bar([x + 0.2 for x in xs], paper, width=0.4, label="paper (COCO val)")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("mAP@[.5:.95] (%)")
    ax.set_title("Faster R-CNN C4: VGG-16 vs ResNet-101")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_study(overrides: Sequence[str] = (), *, configs: Sequence[str] = CONFIGS,
              output_dir: str = "output/paper_study",
              resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train + evaluate each config with the same overrides; write `study.json`, `study.md`, `study.png`.

    Args:
        overrides: `key.sub=value` strings applied to every config.
        configs: Shipped config names or YAML files, one per backbone.
        output_dir: Each run goes to `<output_dir>/<config file stem>`; the reports to `output_dir`.
        resume: Continue each run from its last complete checkpoint.
        progress: Show progress bars.

    Returns:
        The summary (rows per backbone, ours and the paper's; the relative gains).

    Raises:
        FileNotFoundError: A config is neither a file nor a shipped name (before anything trains).
        ValueError, TypeError: A config or an override is invalid (before anything trains).
    """
    from resnet_det.engine.launch import train
    from resnet_det.tasks.detection import DETECTION

    paths = [resolve_config(c) for c in configs]
    loaded = [load_config(path, list(overrides)) for path in paths]  # every config checked before training
    for path, cfg in zip(paths, loaded):
        if cfg.model.task != DETECTION.name:
            raise ValueError(f"{path}: the paper study compares detectors; model.task is {cfg.model.task!r}")
    results: dict[str, dict[str, float]] = {}
    for path, cfg in zip(paths, loaded):
        name = _backbone_name(cfg)
        cfg.train.output_dir = str(Path(output_dir) / path.stem)
        result = train(cfg, DETECTION, resume=resume, progress=progress)
        ev = result.get("eval") or {}  # flattened: {"bbox/AP": ...}
        results[name] = {k.split("/", 1)[1]: v for k, v in ev.items() if k.startswith("bbox/")}
    summary = summarize(results)
    if is_main_process():
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "study.json", json.dumps(summary, indent=2))
        atomic_write(out / "study.md", format_table(summary) + "\n")
        plot(summary, out / "study.png")
        log_report(logger, format_table(summary))
    return summary
