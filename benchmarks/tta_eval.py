"""COCO AP of trained checkpoints with and without test-time augmentation (``test.aug``), through ``resnet-det eval``.

Each row is one ``python -m resnet_det eval CONFIG --checkpoint W --output-dir OUT/<name> --no-progress
[overrides]`` in a fresh process; its wall time and the ``metrics.json`` it writes are collected into one JSON
file with the exact command. Times are for comparison between rows of one run only (a shared CPU).

Usage (the command of benchmarks/tta_cpu_2026-12-02.json; the checkpoints come from the two training commands
written in that file)::

    PYTHONPATH=. python benchmarks/tta_eval.py --out benchmarks/tta_cpu_2026-12-02.json --work output/tta_eval \\
        --shapes output/shapes_tta/model_final.safetensors --tiny-coco output/tiny_coco_tta/model_final.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

AUGMENTATIONS: list[tuple[str, list[str]]] = [
    ("plain", []),
    ("flip", ["test.aug.flip=true"]),
]
MULTI_SCALE = ("flip_3_scales", ["test.aug.flip=true", "test.aug.min_sizes=[224,256,288]", "test.aug.max_size=288"])


def _summary(metrics: dict[str, Any]) -> dict[str, float]:
    """AP and AP50 of each iou type found in an evaluation's metrics.json (fractions)."""
    out: dict[str, float] = {}
    for iou_type in ("bbox", "segm"):
        table = (metrics.get(iou_type) or {}).get("summary")
        if isinstance(table, dict):
            for key in ("AP", "AP50", "AP75"):
                if key in table:
                    out[f"{iou_type}/{key}"] = float(table[key])
    return out


def run_eval(name: str, config: str, checkpoint: str, overrides: list[str], work: Path) -> dict[str, Any]:
    out = work / name
    argv = [sys.executable, "-m", "resnet_det", "eval", config, "--checkpoint", checkpoint, "--output-dir",
            str(out), "--no-progress", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    metrics = json.loads((out / "eval" / "metrics.json").read_text(encoding="utf-8"))
    shown = ["python", "-m", "resnet_det", *argv[3:]]
    row = {"name": name, "command": shlex.join(shown), "wall_seconds": round(seconds, 1), **_summary(metrics)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--work", default="output/tta_eval", help="the evaluations' output folders go here")
    parser.add_argument("--shapes", help="a checkpoint of shapes/faster_rcnn_R_50_FPN")
    parser.add_argument("--tiny-coco", help="a checkpoint of tiny_coco/overfit_R_18_FPN")
    args = parser.parse_args()
    work = Path(args.work)
    rows: dict[str, list[dict[str, Any]]] = {}
    if args.shapes:
        rows["shapes_val"] = [run_eval(f"shapes_{n}", "shapes/faster_rcnn_R_50_FPN", args.shapes, o, work)
                              for n, o in [*AUGMENTATIONS, MULTI_SCALE]]
    if args.tiny_coco:
        rows["tiny_coco"] = [run_eval(f"tiny_coco_{n}", "tiny_coco/overfit_R_18_FPN", args.tiny_coco, o, work)
                             for n, o in AUGMENTATIONS]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
