"""COCO evaluation at val2017 scale: ``resnet-det eval`` against pycocotools and faster-coco-eval.

:func:`generate_eval_set` writes a synthetic, seeded val2017-sized set: an instances file (5,000 images,
36,781 instances, the 80 COCO categories, polygons and ~1% crowd RLE: the generator of
:mod:`resnet_det.studies.startup`) and results files with 100 detections per image (500,000), half of
them near a ground-truth box of the image (jittered, 90% with its category), half anywhere, scores with
4 decimals (so ties occur, as with float32 scores). ``results_bbox.json`` holds ``bbox`` entries,
``results_segm.json`` compressed-RLE ``segmentation`` entries (the detection's box as a mask).

:func:`run` measures, each in a fresh process, ``repeats`` times, interleaved:

* ``ours``: the whole command ``python -m resnet_det eval --results R --annotations A --output-dir D``
  (start-up, reading, validation, evaluation, tables, the PR plot and metrics.json);
* ``pycocotools``: ``COCO(A)``, ``loadRes(R)``, ``COCOeval`` evaluate / accumulate / summarize (its README);
* ``faster-coco-eval``: the same with ``faster_coco_eval.COCO`` and ``COCOeval_faster`` (its README).

Time is the child's wall time from start to exit as the parent sees it (interpreter start-up and imports
included, for all three); memory is the child's peak RSS (``ru_maxrss`` from ``wait4``). The parent stays
small (generation happens in a child) because Linux carries a parent's RSS into a child it starts.

``dist`` (optional, ``--dist-ranks``): a distributed evaluation of the same bbox predictions with
:class:`resnet_det.evaluation.COCOEvaluator` in ``W`` gloo processes (each rank converts and processes its
share of the images, writes its shard, rank 0 evaluates from the shards), for ``W`` in the given world
sizes; reported: rank 0's peak RSS and wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .startup import COCO_CATEGORIES, generate_coco_file

__all__ = ["MODES", "format_table", "generate_eval_set", "rectangle_rle", "run", "write_record"]

MODES = ("ours", "pycocotools", "faster-coco-eval")
IOU_TYPES = ("bbox", "segm")


# ------------------------------------------------------------------------------------------------ generator
def _encode_int(x: int) -> str:
    """One count of pycocotools' compressed RLE string (5 bits per character, sign-extended, + 48)."""
    out = []
    more = True
    while more:
        c = x & 0x1F
        x >>= 5
        more = (x != -1) if (c & 0x10) else (x != 0)
        if more:
            c |= 0x20
        out.append(chr(c + 48))
    return "".join(out)


def rectangle_rle(x0: int, y0: int, x1: int, y1: int, h: int, w: int) -> str:
    """Compressed RLE ``counts`` of the rectangle ``[x0, x1) x [y0, y1)`` in an ``h x w`` image.

    Written directly (no mask is drawn): the column-major counts are ``[x0*h + y0, o, h-o, o, ..., o, rest]``
    with ``o = y1 - y0``, and pycocotools' string stores ``counts[i] - counts[i-2]`` for ``i > 2``, which is 0
    for every repeated column. Canonical (equal to ``mask.encode`` of the drawn mask) when
    ``0 < y1 - y0 < h`` and the rectangle does not end in the image's last pixel.
    """
    ones, gap = y1 - y0, h - (y1 - y0)
    head = x0 * h + y0
    rest = (h - y1) + (w - x1) * h
    if x1 - x0 == 1:
        return _encode_int(head) + _encode_int(ones) + _encode_int(rest)
    return (_encode_int(head) + _encode_int(ones) + _encode_int(gap) + "0" * (2 * (x1 - x0) - 3)
            + _encode_int(rest - gap))


def _detections(gt: dict[str, Any], per_image: int, seed: int) -> dict[str, np.ndarray]:
    """Columns of the detections: image, category, score, box (xywh) and the integer rectangle (segm)."""
    rng = np.random.default_rng(seed + 1)
    images = gt["images"]
    n_img = len(images)
    hw = np.array([[im["height"], im["width"]] for im in images], dtype=np.float64)
    pos = {im["id"]: k for k, im in enumerate(images)}
    anns = [a for a in gt["annotations"] if not a["iscrowd"]]
    a_img = np.array([pos[a["image_id"]] for a in anns], dtype=np.int64)
    a_box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    a_cat = np.array([a["category_id"] for a in anns], dtype=np.int64)
    order = np.argsort(a_img, kind="stable")
    a_img, a_box, a_cat = a_img[order], a_box[order], a_cat[order]
    first = np.searchsorted(a_img, np.arange(n_img))
    count = np.searchsorted(a_img, np.arange(n_img), side="right") - first
    cat_ids = np.array([c[0] for c in COCO_CATEGORIES])

    img = np.repeat(np.arange(n_img), per_image)
    near = (np.tile(np.arange(per_image), n_img) < per_image // 2) & (count[img] > 0)
    n = len(img)
    h, w = hw[img, 0], hw[img, 1]
    # near a ground-truth box: one of the image's boxes, moved and rescaled by ~10%
    pick = first[img] + (rng.random(n) * np.maximum(count[img], 1)).astype(np.int64)
    pick = np.minimum(pick, len(a_box) - 1)
    gb = a_box[pick]
    lo, hi = np.log(0.03), np.log(0.7)
    bw = np.where(near, gb[:, 2] * np.exp(rng.normal(0, 0.12, n)), w * np.exp(rng.uniform(lo, hi, n)))
    bh = np.where(near, gb[:, 3] * np.exp(rng.normal(0, 0.12, n)), h * np.exp(rng.uniform(lo, hi, n)))
    cx = np.where(near, gb[:, 0] + gb[:, 2] / 2 + rng.normal(0, 0.08, n) * gb[:, 2], rng.uniform(0, w))
    cy = np.where(near, gb[:, 1] + gb[:, 3] / 2 + rng.normal(0, 0.08, n) * gb[:, 3], rng.uniform(0, h))
    # integer rectangles strictly inside the image (at least 1 pixel, never the full height nor the last pixel:
    # see rectangle_rle), and the float box is that rectangle: bbox and segm describe the same detection
    x0 = np.clip(np.floor(cx - bw / 2), 0, w - 2).astype(np.int64)
    y0 = np.clip(np.floor(cy - bh / 2), 0, h - 2).astype(np.int64)
    x1 = np.clip(np.ceil(cx + bw / 2), x0 + 1, w - 1).astype(np.int64)
    y1 = np.clip(np.ceil(cy + bh / 2), y0 + 1, h - 1).astype(np.int64)
    cat = np.where(near & (rng.random(n) < 0.9), a_cat[pick], cat_ids[rng.integers(0, len(cat_ids), n)])
    score = np.round(np.where(near, rng.uniform(0.2, 1.0, n), rng.uniform(0.0, 0.8, n)), 4)
    image_id = np.array([im["id"] for im in images], dtype=np.int64)[img]
    return {"image_id": image_id, "category_id": cat, "score": score, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
            "h": h.astype(np.int64), "w": w.astype(np.int64)}


def generate_eval_set(work_dir: str | os.PathLike[str], *, images: int = 5000, instances: int = 36781,
                      per_image: int = 100, seed: int = 0, iou_types: tuple[str, ...] = IOU_TYPES) -> dict[str, Any]:
    """Writes ``annotations.json`` and ``results_<iou_type>.json`` into ``work_dir`` (see the module docstring).

    The content depends only on the arguments (same seed, same bytes).

    Args:
        work_dir: The folder (created).
        images: Images of the instances file.
        instances: Annotations of the instances file.
        per_image: Detections per image.
        seed: Seed of everything random.
        iou_types: Which results files to write.

    Returns:
        ``{"annotations": path, "results": {iou_type: path}, "images", "instances", "detections", "bytes",
        "seconds"}``.
    """
    from resnet_det_common.io import atomic_write

    start = time.perf_counter()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ann_path = work / "annotations.json"
    generate_coco_file(ann_path, images=images, instances=instances, seed=seed)
    with open(ann_path, encoding="utf-8") as f:
        gt = json.load(f)
    cols = _detections(gt, per_image, seed)
    del gt
    ids, cats, scores = cols["image_id"].tolist(), cols["category_id"].tolist(), cols["score"].tolist()
    x0, y0, x1, y1 = (cols[k].tolist() for k in ("x0", "y0", "x1", "y1"))
    out: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for iou_type in iou_types:
        path = work / f"results_{iou_type}.json"
        if iou_type == "bbox":
            rows = [{"image_id": i, "category_id": c, "bbox": [a, b, e - a, d - b], "score": s}
                    for i, c, s, a, b, e, d in zip(ids, cats, scores, x0, y0, x1, y1)]
        else:
            hs, ws = cols["h"].tolist(), cols["w"].tolist()
            rows = [{"image_id": i, "category_id": c,
                     "segmentation": {"size": [hh, ww], "counts": rectangle_rle(a, b, e, d, hh, ww)}, "score": s}
                    for i, c, s, a, b, e, d, hh, ww in zip(ids, cats, scores, x0, y0, x1, y1, hs, ws)]
        atomic_write(path, json.dumps(rows), durable=False)
        del rows
        out[iou_type] = str(path)
        sizes[iou_type] = path.stat().st_size
    return {"annotations": str(ann_path), "results": out, "images": images, "instances": instances,
            "detections": len(ids), "bytes": {"annotations": ann_path.stat().st_size, **sizes},
            "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------------------------------- measuring
def _reference(mode: str, ann_file: str, results_file: str, iou_type: str) -> dict[str, Any]:
    """pycocotools or faster-coco-eval as their READMEs use them, timed by stage (in this fresh process)."""
    import contextlib as _cl
    import io as _io

    t0 = time.perf_counter()
    sink = _io.StringIO()
    with _cl.redirect_stdout(sink):
        if mode == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval as Eval
        else:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as Eval
        t1 = time.perf_counter()
        gt = COCO(ann_file)
        dt = gt.loadRes(results_file)
        t2 = time.perf_counter()
        ev = Eval(gt, dt, iou_type)
        ev.evaluate()
        t3 = time.perf_counter()
        ev.accumulate()
        t4 = time.perf_counter()
        ev.summarize()
    t5 = time.perf_counter()
    return {"stats": [float(s) for s in ev.stats[:12]],
            "stages_s": {"import": round(t1 - t0, 3), "load": round(t2 - t1, 3), "evaluate": round(t3 - t2, 3),
                         "accumulate": round(t4 - t3, 3), "summarize": round(t5 - t4, 3)}}


def _run_child(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs ``argv`` as a fresh process; returns its wall time, peak RSS (``ru_maxrss`` of that child, from
    ``wait4``) and stdout."""
    import signal

    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = start + timeout
    out = bytearray()
    err = bytearray()
    # read both pipes without blocking the child (it may write a lot), then wait4 for its own rusage
    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    while sel.get_map():
        left = deadline - time.perf_counter()
        if left <= 0:
            os.kill(proc.pid, signal.SIGKILL)
            os.wait4(proc.pid, 0)
            raise RuntimeError(f"{' '.join(argv[:6])} ... did not finish in {timeout:.0f} s")
        for key, _ in sel.select(timeout=min(left, 1.0)):
            chunk = os.read(key.fileobj.fileno(), 1 << 16)  # type: ignore[union-attr]
            if chunk:
                key.data.extend(chunk)
            else:
                sel.unregister(key.fileobj)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{' '.join(argv[:6])} ... failed (exit {proc.returncode}): {text[0]}")
    return {"seconds": round(seconds, 3), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_bytes": int(usage.ru_maxrss) * 1024,
            "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace")}


def _last_json(text: str) -> dict[str, Any]:
    return json.loads(text.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    """The children's environment: this checkout first on the path (the parent's own imports)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def _measure(mode: str, files: dict[str, Any], iou_type: str, out_dir: Path, timeout: float) -> dict[str, Any]:
    ann, res = files["annotations"], files["results"][iou_type]
    if mode == "ours":
        target = out_dir / f"ours_{iou_type}"
        argv = [sys.executable, "-m", "resnet_det", "eval", "--results", res, "--annotations", ann,
                "--output-dir", str(target), "--iou-types", iou_type, "--no-progress"]
        row = _run_child(argv, timeout, _env())
        report = json.loads((target / "metrics.json").read_text())
        row["stats"] = report[iou_type]["stats"]
        row["stages_s"] = report["timings_s"][iou_type]
        row["pr_curve"] = (target / f"pr_curve_{iou_type}.png").is_file()
    else:
        argv = [sys.executable, "-m", "resnet_det.studies.eval_bench", "reference", mode, ann, res, iou_type]
        row = _run_child(argv, timeout, _env())
        row.update(_last_json(row["stdout"]))
    row.pop("stdout")
    row.pop("stderr")
    return {"mode": mode, "iou_type": iou_type, **row}


def _dist_rank(rank: int, world: int, init_file: str, ann: str, shard_file: str, out_dir: str,
               gather: str) -> dict[str, Any]:
    """One rank of the distributed measurement: process this rank's detections, evaluate (collective)."""
    import torch
    import torch.distributed as dist

    from resnet_det.evaluation import COCOEvaluator
    from resnet_det_common import all_gather_object, get_world_size, is_main_process

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        evaluator = COCOEvaluator(ann, iou_types=("bbox",), output_dir=Path(out_dir) / "eval", progress=False)
        if gather == "all_gather_object":  # the former way, for comparison: every rank's results to rank 0

            def old_gather() -> Any:
                if get_world_size() == 1:
                    return dict(evaluator._predictions)
                parts = all_gather_object(evaluator._predictions)
                if not is_main_process():
                    return None
                merged: dict[int, Any] = {}
                for part in parts:
                    for img_id, results in part.items():
                        merged.setdefault(img_id, results)
                return merged

            evaluator._gather = old_gather  # type: ignore[method-assign]
        with open(shard_file, encoding="utf-8") as f:
            rows = json.load(f)
        per_image: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            per_image.setdefault(r["image_id"], []).append(r)
        del rows
        ids = sorted(per_image)
        outputs = []
        for i in ids:
            dets = per_image[i]
            xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float64)
            outputs.append({"boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                            "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float64),
                            "labels": torch.tensor([d["category_id"] for d in dets])})
        del per_image
        for s in range(0, len(ids), 8):
            evaluator.process(ids[s:s + 8], outputs[s:s + 8])
        del outputs
        start = time.perf_counter()
        metrics = evaluator.evaluate()
        seconds = time.perf_counter() - start
        return {"rank": rank, "world_size": world, "evaluate_s": round(seconds, 3),
                "AP": metrics.get("bbox", {}).get("AP")}
    finally:
        dist.destroy_process_group()


def _split(results_file: str, world: int, out_dir: str) -> list[str]:
    """Splits a results file into ``world`` shares by image (as a DistributedSampler deals images out)."""
    with open(results_file, encoding="utf-8") as f:
        rows = json.load(f)
    ids = sorted({r["image_id"] for r in rows})
    owner = {i: k % world for k, i in enumerate(ids)}
    paths = []
    for rank in range(world):
        path = Path(out_dir) / f"share_{rank}_of_{world}.json"
        path.write_text(json.dumps([r for r in rows if owner[r["image_id"]] == rank]))
        paths.append(str(path))
    return paths


def _measure_dist(files: dict[str, Any], world: int, gather: str, work: Path, timeout: float) -> dict[str, Any]:
    folder = work / f"dist_{world}_{gather}"
    folder.mkdir(parents=True, exist_ok=True)
    split = _run_child([sys.executable, "-m", "resnet_det.studies.eval_bench", "split", files["results"]["bbox"],
                        str(world), str(folder)], timeout, _env())
    shares = json.loads(split["stdout"].strip().splitlines()[-1])
    init = folder / "init"
    init.unlink(missing_ok=True)
    argv = [[sys.executable, "-m", "resnet_det.studies.eval_bench", "dist-rank", str(r), str(world), str(init),
             files["annotations"], shares[r], str(folder), gather] for r in range(world)]
    import threading

    rows: list[dict[str, Any] | BaseException] = [RuntimeError("not run")] * world

    def one(r: int) -> None:
        try:
            row = _run_child(argv[r], timeout, _env())
            rows[r] = {**_last_json(row["stdout"]), "seconds": row["seconds"], "peak_rss_bytes": row["peak_rss_bytes"]}
        except BaseException as e:
            rows[r] = e

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, row in enumerate(rows):
        if isinstance(row, BaseException):
            raise RuntimeError(f"dist rank {r} of {world}: {row}")
    return {"world_size": world, "gather": gather, "ranks": rows}


def versions() -> dict[str, str]:
    """Versions of what the measurement depends on."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("resnet-det", "numpy", "pycocotools", "faster-coco-eval", "torch", "matplotlib"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def run(*, images: int = 5000, instances: int = 36781, per_image: int = 100, seed: int = 0, repeats: int = 3,
        iou_types: tuple[str, ...] = IOU_TYPES, modes: tuple[str, ...] = MODES, dist_ranks: tuple[int, ...] = (),
        dist_gathers: tuple[str, ...] = ("shards",), work_dir: str | os.PathLike[str] | None = None,
        timeout: float = 1800.0, progress: Any = None,
        partial: Any = None) -> dict[str, Any]:
    """Generates the set (in a child process) and measures every mode, each in a fresh process.

    Args:
        images, instances, per_image, seed: The generated set (see :func:`generate_eval_set`).
        repeats: Measurements per (mode, iou type), interleaved; the summary is their median.
        iou_types: ``bbox`` and/or ``segm``.
        modes: Any of :data:`MODES`.
        dist_ranks: World sizes of the distributed measurement (bbox; empty: none).
        dist_gathers: ``"shards"`` (ours) and/or ``"all_gather_object"`` (the former way, for comparison).
        work_dir: Where the files go (default: a temporary folder, deleted afterwards).
        timeout: Seconds allowed to each child.
        progress: Called with a line of text after each step (e.g. ``print``), or None.
        partial: Called with the record so far after each measurement (``"partial": True`` in it), so that
            an interrupted run leaves what it measured; or None.

    Returns:
        The record: ``set``, ``runs`` (every measurement), ``summary``, ``dist``, ``machine``, ``versions``,
        ``date``, ``load_average_before`` / ``_after``.
    """
    from .startup import machine

    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    say = progress or (lambda _line: None)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        wanted = {"images": images, "instances": instances, "per_image": per_image, "seed": seed,
                  "iou_types": list(iou_types)}
        meta = work / "set" / "set.json"
        files = json.loads(meta.read_text()) if meta.is_file() else None
        if files is None or files.get("wanted") != wanted:  # a kept work folder with the same set is reused
            gen = _run_child([sys.executable, "-m", "resnet_det.studies.eval_bench", "generate", str(work / "set"),
                              "--images", str(images), "--instances", str(instances), "--per-image",
                              str(per_image), "--seed", str(seed), "--iou-types", *iou_types], timeout, _env())
            files = {**_last_json(gen["stdout"]), "wanted": wanted}
            meta.write_text(json.dumps(files))
            say(f"generated {files['detections']:,} detections on {images:,} images in {files['seconds']:.0f} s")
        runs: list[dict[str, Any]] = []
        dist: list[dict[str, Any]] = []

        def record(done: bool) -> dict[str, Any]:
            return {"set": {k: v for k, v in files.items() if k not in ("annotations", "results", "wanted")},
                    "repeats": repeats, "runs": runs, "summary": summarize(runs), "dist": dist,
                    "machine": machine(), "versions": versions(),
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
                    "parent_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    **({} if done else {"partial": True}),
                    "note": "seconds: wall time of each fresh child process (start-up and imports included); peak "
                            "RSS: ru_maxrss of that child (wait4); the parent stays small (parent_peak_rss_bytes) "
                            "because Linux carries a parent's RSS into the children it starts"}

        # the distributed figures first (one run each), then the repeats, interleaved
        for gather in dist_gathers:
            for world in dist_ranks:
                if world == 1 and gather != dist_gathers[0]:
                    continue  # one process gathers nothing: the same run whatever the method
                row = _measure_dist(files, world, gather, work, timeout)
                dist.append(row)
                r0 = row["ranks"][0]
                say(f"  dist {gather:<17} world {world}: rank 0 peak RSS {r0['peak_rss_bytes'] / 2**30:.2f} GiB, "
                    f"evaluate {r0['evaluate_s']:.1f} s, AP {r0['AP']:.4f}")
                if partial is not None:
                    partial(record(False))
        for r in range(repeats):
            for iou_type in iou_types:
                for mode in modes:
                    row = {"repeat": r, **_measure(mode, files, iou_type, work, timeout)}
                    runs.append(row)
                    say(f"  {iou_type:<5} {mode:<17} {row['seconds']:7.2f} s   peak RSS "
                        f"{row['peak_rss_bytes'] / 2**30:.2f} GiB   AP {row['stats'][0]:.4f}   "
                        f"load {os.getloadavg()[0]:.1f}")
                    if partial is not None:
                        partial(record(False))
        return record(True)


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per iou type and mode: median seconds and peak RSS, AP, and the ratios to the two references."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in runs:
        out.setdefault(row["iou_type"], {}).setdefault(row["mode"], {"rows": []})["rows"].append(row)
    for per_mode in out.values():
        for agg in per_mode.values():
            rows = agg.pop("rows")
            agg["seconds"] = round(statistics.median(r["seconds"] for r in rows), 3)
            agg["peak_rss_gib"] = round(statistics.median(r["peak_rss_bytes"] for r in rows) / 2**30, 3)
            if all("cpu_seconds" in r for r in rows):
                agg["cpu_seconds"] = round(statistics.median(r["cpu_seconds"] for r in rows), 3)
            agg["AP"] = rows[0]["stats"][0]
            agg["n"] = len(rows)
        for agg in per_mode.values():
            for ref in ("faster-coco-eval", "pycocotools"):
                if ref in per_mode:
                    agg[f"time_x_{ref}"] = round(agg["seconds"] / per_mode[ref]["seconds"], 3)
                    agg[f"peak_x_{ref}"] = round(agg["peak_rss_gib"] / per_mode[ref]["peak_rss_gib"], 3)
                    if "cpu_seconds" in agg and "cpu_seconds" in per_mode[ref]:
                        agg[f"cpu_x_{ref}"] = round(agg["cpu_seconds"] / per_mode[ref]["cpu_seconds"], 3)
    return out


def format_table(record: dict[str, Any]) -> str:
    """The summary (and the distributed figures) as text."""
    lines = [f"{'':<6}{'':<18}{'time (s)':>9}{'x fce':>8}{'x pycoco':>9}{'CPU (s)':>9}{'x fce':>8}"
             f"{'peak RSS (GiB)':>16}{'x pycoco':>9}{'AP':>9}"]
    for iou_type, per_mode in record["summary"].items():
        for mode, row in per_mode.items():
            def ratio(key: str, width: int, row: dict[str, Any] = row) -> str:
                return f"{row[key]:>{width - 1}.2f}x" if key in row else f"{'-':>{width}}"

            cpu = f"{row['cpu_seconds']:>9.2f}" if "cpu_seconds" in row else f"{'-':>9}"
            lines.append(f"{iou_type:<6}{mode:<18}{row['seconds']:>9.2f}{ratio('time_x_faster-coco-eval', 8)}"
                         f"{ratio('time_x_pycocotools', 9)}{cpu}{ratio('cpu_x_faster-coco-eval', 8)}"
                         f"{row['peak_rss_gib']:>16.2f}{ratio('peak_x_pycocotools', 9)}{row['AP']:>9.4f}")
    for row in record.get("dist", []):
        r0 = row["ranks"][0]
        others = [r["peak_rss_bytes"] / 2**30 for r in row["ranks"][1:]]
        lines.append(f"dist ({row['gather']}), {row['world_size']} gloo ranks: rank 0 peak RSS "
                     f"{r0['peak_rss_bytes'] / 2**30:.2f} GiB (others {', '.join(f'{x:.2f}' for x in others) or '-'})"
                     f", rank 0 evaluate() {r0['evaluate_s']:.1f} s, AP {r0['AP']:.4f}")
    return "\n".join(lines)


def write_record(record: dict[str, Any], out_dir: str | os.PathLike[str], command: list[str]) -> tuple[Path, Path]:
    """Writes ``eval_benchmark.json`` (the record and its command) and ``eval_benchmark.txt`` (the command on its
    first line, then the table) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "eval_benchmark.json"
    js.write_text(json.dumps({"command": command, **record}, indent=2) + "\n")
    txt = out / "eval_benchmark.txt"
    head = "PARTIAL RECORD: the run was interrupted; these are the measurements it finished\n\n" \
        if record.get("partial") else ""
    txt.write_text(" ".join(command) + "\n\n" + head + format_table(record) + "\n\n"
                   f"date {record['date']}; load average before {record['load_average_before']}, after "
                   f"{record['load_average_after']}; {record['machine'].get('cpu', '?')}, "
                   f"{record['machine'].get('cpus')} CPUs\nversions {json.dumps(record['versions'])}\n")
    return js, txt


def _main(argv: list[str]) -> int:
    """Child entry points (each prints one JSON line): ``generate``, ``reference``, ``split``, ``dist-rank``."""
    parser = argparse.ArgumentParser(prog="python -m resnet_det.studies.eval_bench")
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("generate")
    g.add_argument("folder")
    g.add_argument("--images", type=int, default=5000)
    g.add_argument("--instances", type=int, default=36781)
    g.add_argument("--per-image", type=int, default=100)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--iou-types", nargs="+", default=list(IOU_TYPES))
    r = sub.add_parser("reference")
    r.add_argument("mode", choices=("pycocotools", "faster-coco-eval"))
    r.add_argument("annotations")
    r.add_argument("results")
    r.add_argument("iou_type")
    s = sub.add_parser("split")
    s.add_argument("results")
    s.add_argument("world", type=int)
    s.add_argument("folder")
    d = sub.add_parser("dist-rank")
    d.add_argument("rank", type=int)
    d.add_argument("world", type=int)
    d.add_argument("init_file")
    d.add_argument("annotations")
    d.add_argument("share")
    d.add_argument("folder")
    d.add_argument("gather", choices=("shards", "all_gather_object"))
    args = parser.parse_args(argv)
    if args.what == "generate":
        result: Any = generate_eval_set(args.folder, images=args.images, instances=args.instances,
                                        per_image=args.per_image, seed=args.seed, iou_types=tuple(args.iou_types))
    elif args.what == "reference":
        result = _reference(args.mode, args.annotations, args.results, args.iou_type)
    elif args.what == "split":
        result = _split(args.results, args.world, args.folder)
    else:
        result = _dist_rank(args.rank, args.world, args.init_file, args.annotations, args.share, args.folder,
                            args.gather)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
