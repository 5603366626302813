"""Time and peak memory of ``resnet-det analyze`` on a val2017-sized set (seeded, generated here).

    python benchmarks/analyze_scale.py [--out DIR] [--images 5000] [--dets-per-image 100] [--seed 0]

The set: 5,000 images (640x480), 36,781 ground-truth boxes over 80 categories (category frequencies
skewed like COCO's, 1% crowds, sizes spread over small / medium / large), 100 detections per image:
half near a ground-truth box (jittered, 90% with its category), half anywhere. The command runs in
its own process (``--no-progress``); wall time and the child's peak RSS (``getrusage``) are reported
with its CPU time (user + system: less sensitive than wall time to other processes on a shared
machine), the load average and the stage times the analysis logs, and written to ``DIR/result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_GT = 36_781


def make_set(n_images: int, dets_per_image: int, seed: int) -> tuple[dict, list[dict]]:
    """The ground truth and the results (see the module docstring)."""
    rng = np.random.default_rng(seed)
    w_img, h_img = 640, 480
    cats = [{"id": c, "name": f"category_{c}"} for c in range(1, 81)]
    freq = 1.0 / np.arange(1, 81) ** 0.9
    freq /= freq.sum()
    per_img = rng.multinomial(round(N_GT * n_images / 5000), np.full(n_images, 1 / n_images))
    images = [{"id": i + 1, "width": w_img, "height": h_img, "file_name": f"{i + 1:012d}.jpg"}
              for i in range(n_images)]
    n = int(per_img.sum())
    img_of = np.repeat(np.arange(n_images), per_img) + 1
    side = np.exp(rng.uniform(np.log(8), np.log(400), n))
    aspect = np.exp(rng.normal(0, 0.4, n))
    bw, bh = np.minimum(side * aspect, w_img - 1), np.minimum(side / aspect, h_img - 1)
    bx, by = rng.uniform(0, w_img - bw), rng.uniform(0, h_img - bh)
    cat = rng.choice(80, n, p=freq) + 1
    crowd = rng.random(n) < 0.01
    anns = [{"id": i + 1, "image_id": int(img_of[i]), "category_id": int(cat[i]),
             "bbox": [float(bx[i]), float(by[i]), float(bw[i]), float(bh[i])], "area": float(bw[i] * bh[i]),
             "iscrowd": int(crowd[i])} for i in range(n)]

    starts = np.r_[0, np.cumsum(per_img)]
    near = dets_per_image // 2
    results = []
    for i in range(n_images):
        k = int(per_img[i])
        n_near = near if k else 0
        src = starts[i] + rng.integers(0, max(k, 1), n_near)
        jx, jy = rng.normal(0, 0.15, (2, n_near))
        sw, sh = np.exp(rng.normal(0, 0.15, (2, n_near)))
        x = bx[src] + jx * bw[src]
        y = by[src] + jy * bh[src]
        c = np.where(rng.random(n_near) < 0.9, cat[src], rng.integers(1, 81, n_near))
        s = rng.beta(5, 2, n_near)
        n_far = dets_per_image - n_near
        fw, fh = np.exp(rng.uniform(np.log(8), np.log(300), (2, n_far)))
        fx, fy = rng.uniform(0, w_img - fw), rng.uniform(0, h_img - fh)
        boxes = np.c_[np.r_[x, fx], np.r_[y, fy], np.r_[bw[src] * sw, fw], np.r_[bh[src] * sh, fh]]
        cs = np.r_[c, rng.choice(80, n_far, p=freq) + 1]
        ss = np.r_[s, rng.beta(2, 5, n_far)]
        results += [{"image_id": i + 1, "category_id": int(cc), "bbox": [round(float(v), 2) for v in b],
                     "score": round(float(sc), 4)} for b, cc, sc in zip(boxes.tolist(), cs, ss)]
    return {"images": images, "annotations": anns, "categories": cats}, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write result.json and the plots here (default: print only)")
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--dets-per-image", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        gt, results = make_set(args.images, args.dets_per_image, args.seed)
        (tmp / "gt.json").write_text(json.dumps(gt))
        (tmp / "results.json").write_text(json.dumps(results))
        print(f"generated {len(gt['images'])} images, {len(gt['annotations'])} gts, {len(results)} detections "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        cmd = [sys.executable, "-m", "resnet_det", "analyze", "--results", str(tmp / "results.json"),
               "--annotations", str(tmp / "gt.json"), "--output-dir", str(tmp / "analysis"), "--no-progress"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_gib, cpu_s = usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        report = json.loads((tmp / "analysis" / "metrics.json").read_text())
        if args.out:  # the plots of the run, next to its numbers
            Path(args.out).mkdir(parents=True, exist_ok=True)
            for name in ("tide_errors.png", "reliability.png", "pr_by_size.png"):  # the others: 80 made-up names
                (Path(args.out) / name).write_bytes((tmp / "analysis" / name).read_bytes())
    out = {
        "command": "python benchmarks/analyze_scale.py " + " ".join(sys.argv[1:]),
        "analyze_command": "resnet-det analyze --results R --annotations A --output-dir D --no-progress",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
                   f"numpy {np.__version__}",
        "num_images": report["num_images"], "num_gt": report["num_gt"], "num_detections": report["num_detections"],
        "wall_s": round(wall, 2), "cpu_s": round(cpu_s, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2), "peak_rss_gib": round(peak_gib, 2),
        "stages_s": report["timings_s"], "stages_cpu_s": report["timings_cpu_s"],
        "AP": report["summary"]["AP"], "AP50": report["summary"]["AP50"], "D-ECE": report["calibration"]["D-ECE"],
        "tide_dAP50": report["tide"]["dAP"],
    }
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "result.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
