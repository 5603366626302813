"""Start-up cost of a COCO dataset at train2017 scale: pycocotools' ``COCO()`` against ours, with and without
the cached index.

:func:`generate_coco_file` writes a synthetic, deterministic instances file the size of train2017 (118,287
images, 860,001 instances by default: about seven polygons per image, the 80 COCO categories with their
ids, ~1% crowd annotations as uncompressed RLE with COCO's 9001... ids, images in COCO's sizes with all of
COCO's image fields, annotations in random image order as in the real file). :func:`run` then measures, each
in a fresh Python process (so that one measurement's memory cannot leak into the next and the peak RSS is
that process's own, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

* ``pycocotools``: ``pycocotools.coco.COCO(ann_file)`` (read, parse, index);
* ``ours``: :class:`resnet_det.data.CocoDetection` for training without the cache (read, parse, validate,
  columnar index);
* ``ours_write_cache``: the same while writing the cached index (what rank 0 pays once);
* ``ours_cached``: :class:`resnet_det.data.CocoDetection` from the cached index (what the other ranks and
  every later run pay).

Every process imports the same modules (torch, pycocotools, ``resnet_det.data``) before the clock starts, so
the peaks compare like with like; the RSS after those imports is reported too, and the growth over it is
the cost of the dataset itself. The parent process stays small (the file is generated in a child too),
because Linux carries a parent's peak RSS into a child it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["COCO_CATEGORIES", "MODES", "format_table", "generate_coco_file", "run", "write_record"]

_CATEGORY_TABLE = (
    "1:person:person 2:bicycle:vehicle 3:car:vehicle 4:motorcycle:vehicle 5:airplane:vehicle 6:bus:vehicle "
    "7:train:vehicle 8:truck:vehicle 9:boat:vehicle 10:traffic_light:outdoor 11:fire_hydrant:outdoor "
    "13:stop_sign:outdoor 14:parking_meter:outdoor 15:bench:outdoor 16:bird:animal 17:cat:animal 18:dog:animal "
    "19:horse:animal 20:sheep:animal 21:cow:animal 22:elephant:animal 23:bear:animal 24:zebra:animal "
    "25:giraffe:animal 27:backpack:accessory 28:umbrella:accessory 31:handbag:accessory 32:tie:accessory "
    "33:suitcase:accessory 34:frisbee:sports 35:skis:sports 36:snowboard:sports 37:sports_ball:sports "
    "38:kite:sports 39:baseball_bat:sports 40:baseball_glove:sports 41:skateboard:sports 42:surfboard:sports "
    "43:tennis_racket:sports 44:bottle:kitchen 46:wine_glass:kitchen 47:cup:kitchen 48:fork:kitchen "
    "49:knife:kitchen 50:spoon:kitchen 51:bowl:kitchen 52:banana:food 53:apple:food 54:sandwich:food "
    "55:orange:food 56:broccoli:food 57:carrot:food 58:hot_dog:food 59:pizza:food 60:donut:food 61:cake:food "
    "62:chair:furniture 63:couch:furniture 64:potted_plant:furniture 65:bed:furniture 67:dining_table:furniture "
    "70:toilet:furniture 72:tv:electronic 73:laptop:electronic 74:mouse:electronic 75:remote:electronic "
    "76:keyboard:electronic 77:cell_phone:electronic 78:microwave:appliance 79:oven:appliance "
    "80:toaster:appliance 81:sink:appliance 82:refrigerator:appliance 84:book:indoor 85:clock:indoor "
    "86:vase:indoor 87:scissors:indoor 88:teddy_bear:indoor 89:hair_drier:indoor 90:toothbrush:indoor"
)
#: The 80 COCO categories: (id, name, supercategory), ids 1..90 with COCO's gaps.
COCO_CATEGORIES: tuple[tuple[int, str, str], ...] = tuple(
    (int(i), name.replace("_", " "), sup) for i, name, sup in (row.split(":") for row in _CATEGORY_TABLE.split())
)

#: (height, width) of COCO images and how often they occur (roughly train2017's most common sizes).
_SIZES = ((480, 640), (427, 640), (640, 480), (640, 427), (375, 500), (360, 640), (424, 640), (612, 612),
          (333, 500), (640, 640))
_SIZE_P = (0.40, 0.20, 0.10, 0.08, 0.05, 0.05, 0.04, 0.03, 0.025, 0.025)
_LICENSES = [{"url": f"http://creativecommons.org/licenses/{k}/2.0/", "id": i, "name": n} for i, (k, n) in
             enumerate([("by-nc-sa", "Attribution-NonCommercial-ShareAlike License"),
                        ("by-nc", "Attribution-NonCommercial License"),
                        ("by-nc-nd", "Attribution-NonCommercial-NoDerivs License"), ("by", "Attribution License"),
                        ("by-sa", "Attribution-ShareAlike License"), ("by-nd", "Attribution-NoDerivs License")], 1)]

#: What each measurement builds (see the module docstring).
MODES = ("pycocotools", "ours", "ours_write_cache", "ours_cached")


# ------------------------------------------------------------------------------------------------ generator
def _images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    span = max(581929, 5 * n)  # train2017's largest image id is 581929
    ids = rng.choice(span, size=n, replace=False) + 1
    sizes = np.array(_SIZES)[rng.choice(len(_SIZES), size=n, p=_SIZE_P)]
    lic = rng.integers(1, 7, size=n)
    days = rng.integers(0, 365, size=n)
    farm, server, photo = rng.integers(1, 10, size=n), rng.integers(1000, 9000, size=n), rng.integers(10**9, 10**10, n)
    base = datetime.datetime(2013, 11, 1)
    images = []
    for i in range(n):
        iid = int(ids[i])
        name = f"{iid:012d}.jpg"
        images.append({
            "license": int(lic[i]), "file_name": name,
            "coco_url": f"http://images.cocodataset.org/train2017/{name}",
            "height": int(sizes[i, 0]), "width": int(sizes[i, 1]),
            "date_captured": (base + datetime.timedelta(days=int(days[i]), seconds=i % 86400)).isoformat(" "),
            "flickr_url": f"http://farm{farm[i]}.staticflickr.com/{server[i]}/{photo[i]}_{iid:x}_z.jpg",
            "id": iid,
        })
    return ids, sizes, images


def _rectangle_rle(x0: int, y0: int, x1: int, y1: int, h: int, w: int) -> list[int]:
    """Uncompressed column-major RLE of the rectangle [x0, x1) x [y0, y1) in an h x w image."""
    ones, counts = y1 - y0, [x0 * h + y0]
    for _ in range(x1 - x0 - 1):
        counts += [ones, h - ones]
    counts += [ones, (h - y1) + (w - x1) * h]
    return counts


def _annotations(rng: np.random.Generator, image_ids: np.ndarray, sizes: np.ndarray, index: np.ndarray,
                 first_id: int, crowd_fraction: float) -> list[dict[str, Any]]:
    """Annotations on images ``index`` (positions in ``image_ids``), polygons or crowd RLE rectangles."""
    n = len(index)
    h, w = sizes[index, 0].astype(np.float64), sizes[index, 1].astype(np.float64)
    cat_ids = np.array([c[0] for c in COCO_CATEGORIES])
    p = np.full(len(cat_ids), 0.7 / (len(cat_ids) - 1))
    p[0] = 0.3  # person, as in COCO
    cats = cat_ids[rng.choice(len(cat_ids), size=n, p=p)]
    # object size: a log-uniform fraction of the image side, centre anywhere it fits
    lo, hi = np.log(0.03), np.log(0.9)
    rw = w * np.exp(rng.uniform(lo, hi, n))
    rh = h * np.exp(rng.uniform(lo, hi, n))
    cx, cy = rng.uniform(rw / 2, w - rw / 2), rng.uniform(rh / 2, h - rh / 2)
    crowd = rng.random(n) < crowd_fraction
    parts = np.where(crowd, 0, rng.choice([1, 2, 3], size=n, p=[0.88, 0.09, 0.03]))
    # every polygon at once: its annotation, its part number and its point count
    poly_ann = np.repeat(np.arange(n), parts)
    poly_part = np.arange(len(poly_ann)) - np.repeat(np.cumsum(parts) - parts, parts)
    npts = rng.integers(4, 9, size=len(poly_ann))
    pt_poly = np.repeat(np.arange(len(poly_ann)), npts)
    pt_ann, pt_part = poly_ann[pt_poly], poly_part[pt_poly]
    ang = rng.uniform(0, 2 * np.pi, len(pt_poly))
    ang = ang[np.lexsort((ang, pt_poly))]  # sorted within each polygon: a simple (star-shaped) polygon
    rad = rng.uniform(0.55, 1.0, len(pt_poly)) / (1 + pt_part)
    px = np.clip(cx[pt_ann] + np.cos(ang) * rad * rw[pt_ann] / 2 + pt_part * rw[pt_ann] / 4, 0, w[pt_ann])
    py = np.clip(cy[pt_ann] + np.sin(ang) * rad * rh[pt_ann] / 2, 0, h[pt_ann])
    # hundredths as integers, then / 100: the shortest repr of each value has two decimals, as in COCO
    px, py = np.rint(px * 100) / 100, np.rint(py * 100) / 100
    start = np.cumsum(npts) - npts
    nxt = np.arange(len(pt_poly)) + 1
    nxt[start + npts - 1] = start  # the point after the last one of a polygon is its first
    shoelace = np.bincount(pt_poly, px * py[nxt] - py * px[nxt], minlength=len(poly_ann))
    area = np.bincount(poly_ann, np.abs(shoelace) / 2, minlength=n)
    xy = np.stack([px, py], 1).ravel().tolist()
    pt_start = np.cumsum(parts) - parts  # first polygon of each annotation
    out: list[dict[str, Any]] = []
    for k in range(n):
        img = int(image_ids[index[k]])
        H, W = int(h[k]), int(w[k])
        if crowd[k]:
            x0, y0 = int(cx[k] - rw[k] / 2), int(cy[k] - rh[k] / 2)
            x1, y1 = max(x0 + 1, int(cx[k] + rw[k] / 2)), max(y0 + 1, int(cy[k] + rh[k] / 2))
            out.append({"segmentation": {"counts": _rectangle_rle(x0, y0, x1, y1, H, W), "size": [H, W]},
                        "area": (x1 - x0) * (y1 - y0), "iscrowd": 1, "image_id": img,
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": int(cats[k]),
                        "id": 900100000000 + first_id + k})
            continue
        polys = [xy[2 * start[q]:2 * (start[q] + npts[q])] for q in range(pt_start[k], pt_start[k] + parts[k])]
        s, e = 2 * start[pt_start[k]], 2 * (start[pt_start[k] + parts[k] - 1] + npts[pt_start[k] + parts[k] - 1])
        xs, ys = xy[s:e:2], xy[s + 1:e:2]
        x0, y0 = min(xs), min(ys)
        out.append({"segmentation": polys, "area": round(float(area[k]), 4), "iscrowd": 0, "image_id": img,
                    "bbox": [x0, y0, round(max(xs) - x0, 2), round(max(ys) - y0, 2)],
                    "category_id": int(cats[k]), "id": first_id + k})
    return out


def generate_coco_file(path: str | os.PathLike[str], *, images: int = 118287, instances: int = 860001,
                       seed: int = 0, crowd_fraction: float = 0.01, chunk: int = 20000) -> dict[str, Any]:
    """Writes a synthetic COCO instances file of train2017's shape (see the module docstring).

    The content depends only on the arguments (same seed, same bytes). The file is streamed: memory stays
    near one chunk of annotations.

    Args:
        path: The JSON file to write (its folder is created).
        images: Entries in ``images``.
        instances: Entries in ``annotations``, spread over the images at random (about seven per image for
            the defaults; a few images get none, as in COCO).
        seed: Seed of everything random.
        crowd_fraction: Share of crowd annotations (uncompressed RLE rectangles).
        chunk: Annotations generated and written at a time.

    Returns:
        ``{"path", "bytes", "images", "annotations", "seconds"}``.

    Raises:
        ValueError: ``images`` or ``instances`` below 1.
    """
    from resnet_det_common import atomic_write  # here: it imports torch, which the measuring parent must not

    if images < 1 or instances < 1:
        raise ValueError(f"images={images} and instances={instances} must both be >= 1")
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image_ids, sizes, image_entries = _images(rng, images)
    owner = rng.permutation(np.repeat(np.arange(images), np.bincount(rng.integers(0, images, instances),
                                                                     minlength=images)))

    def write(tmp: Path) -> None:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write('{"info": ' + json.dumps({"description": "synthetic train2017-sized COCO (resnet-det "
                                                              "benchmark-startup)", "version": "1.0", "year": 2017,
                                              "seed": seed}))
            f.write(', "licenses": ' + json.dumps(_LICENSES) + ', "images": [')
            for s in range(0, images, chunk):
                f.write((", " if s else "") + json.dumps(image_entries[s:s + chunk])[1:-1])
            f.write('], "annotations": [')
            for s in range(0, instances, chunk):
                anns = _annotations(rng, image_ids, sizes, owner[s:s + chunk], s + 1, crowd_fraction)
                f.write((", " if s else "") + json.dumps(anns)[1:-1])
            cats = [{"supercategory": s, "id": i, "name": n} for i, n, s in COCO_CATEGORIES]
            f.write('], "categories": ' + json.dumps(cats) + "}")

    atomic_write(path, write, durable=False)
    return {"path": str(path), "bytes": path.stat().st_size, "images": images, "annotations": instances,
            "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------------------------------- measuring
_LABELS = {"pycocotools": "pycocotools COCO()", "ours": "ours, no cache", "ours_write_cache": "ours, writing the cache",
           "ours_cached": "ours, from the cache"}


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm_bytes() -> int | None:
    """Peak RSS of this process's current address space (``VmHWM``; unlike ``ru_maxrss`` it never includes
    the parent's peak, which Linux carries into a child across ``exec``)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def measure(mode: str, ann_file: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Builds one dataset (``mode``, one of :data:`MODES`) in this process; returns time and memory.

    Meant to run in a fresh process (see :func:`run`): the peak RSS is the process's own.

    Returns:
        ``{"mode", "seconds", "peak_rss_bytes" (ru_maxrss), "vm_hwm_bytes", "base_rss_bytes", "rss_after_bytes",
        "items"}``, ``base`` being the RSS after the imports, before the clock starts.

    Raises:
        ValueError: Unknown ``mode``, or a cache mode without ``cache_dir``.
        RuntimeError: ``ours_cached`` found no cache, or ``ours_write_cache`` found one.
    """
    import contextlib
    import gc
    import io
    import logging

    import pycocotools.coco
    import torch  # noqa: F401 - every mode pays the same imports, so the peaks compare like with like

    from resnet_det.data import CocoDetection

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if mode != "pycocotools" and mode != "ours" and cache_dir is None:
        raise ValueError(f"mode {mode!r} needs a cache folder")
    logging.getLogger("resnet_det.data").setLevel(logging.ERROR)  # the summary line of 87 empty images is not news
    gc.collect()
    base = _rss_bytes()
    start = time.perf_counter()
    if mode == "pycocotools":
        with contextlib.redirect_stdout(io.StringIO()):
            obj: Any = pycocotools.coco.COCO(str(ann_file))
        items = len(obj.imgs)
    else:
        obj = CocoDetection(Path(ann_file).parent, ann_file, training=True,
                            cache_dir=None if mode == "ours" else cache_dir)
        expected = {"ours": "built", "ours_write_cache": "built", "ours_cached": "cache"}[mode]
        if obj.index_source != expected:
            raise RuntimeError(f"{mode}: the index was {obj.index_source}, expected {expected}")
        items = len(obj)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"mode": mode, "seconds": round(seconds, 3), "peak_rss_bytes": peak, "vm_hwm_bytes": _vm_hwm_bytes(),
            "base_rss_bytes": base, "rss_after_bytes": _rss_bytes(), "items": items}


def _child(args: list[str], timeout: float) -> dict[str, Any]:
    """Runs ``python -m resnet_det.studies.startup ARGS`` and returns the JSON line it prints last."""
    proc = subprocess.run([sys.executable, "-m", "resnet_det.studies.startup", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{' '.join(args[:2])} failed (exit {proc.returncode}): {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    """The CPU, core count, memory and load the figures were measured with."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    with contextlib.suppress(OSError, ValueError):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def versions() -> dict[str, str]:
    """Versions of what the measurement depends on (read without importing torch in this process)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("resnet-det", "numpy", "pycocotools", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def run(*, images: int = 118287, instances: int = 860001, seed: int = 0, repeats: int = 1,
        ann_file: str | os.PathLike[str] | None = None, work_dir: str | os.PathLike[str] | None = None,
        timeout: float = 1800.0, progress: Any = None) -> dict[str, Any]:
    """Generates the file (unless ``ann_file`` is given) and measures every mode of :data:`MODES`, each in a
    fresh process, ``repeats`` times, interleaved (pycocotools, ours, ours writing the cache, ours from it).

    Args:
        images: Images of the generated file.
        instances: Annotations of the generated file.
        seed: Generator seed.
        repeats: Measurements per mode; the summary is their median.
        ann_file: Measure this file instead of generating one.
        work_dir: Where the file and the cache go (default: a temporary folder, deleted afterwards).
        timeout: Seconds allowed to each child process.
        progress: Called with a line of text after each step (e.g. ``print``), or None.

    Returns:
        The record: ``file``, ``runs`` (every measurement), ``summary`` (per mode: median seconds and peak RSS,
        growth over the after-import RSS, and their ratios to pycocotools'), ``machine``, ``versions``.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    say = progress or (lambda _line: None)
    load_before = machine().get("load_average")
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        if ann_file is None:
            path = work / f"synthetic_{images}x{instances}_s{seed}.json"
            file_info = _child(["generate", str(path), "--images", str(images), "--instances", str(instances),
                                "--seed", str(seed)], timeout)
            say(f"generated {path} ({file_info['bytes'] / 2**20:.0f} MiB) in {file_info['seconds']:.0f} s")
        else:
            path = Path(ann_file)
            file_info = {"path": str(path), "bytes": path.stat().st_size}
        cache = work / "index_cache"
        runs = []
        for r in range(repeats):
            for mode in MODES:
                if mode == "ours_write_cache" and cache.exists():
                    for f in cache.iterdir():
                        f.unlink()
                row = {"repeat": r, **_child(["measure", mode, str(path), "--cache", str(cache)], timeout)}
                runs.append(row)
                say(f"  {_LABELS[mode]:<24} {row['seconds']:7.2f} s   peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB")
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"file": {**file_info, "path": str(path) if ann_file is not None else path.name, "seed": seed},
            "repeats": repeats, "runs": runs, "summary": summarize(runs),
            "machine": {**machine(), "load_average_before": load_before},
            "versions": versions(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "parent_peak_rss_bytes": parent,
            "note": "peak RSS is ru_maxrss of each child; it equals VmHWM when the parent (parent_peak_rss_bytes) "
                    "stays below the child's peak, as Linux carries the parent's peak into a child"}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per mode: medians of seconds, peak RSS and growth (peak - after-import RSS), and ratios to pycocotools."""
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        rows = [r for r in runs if r["mode"] == mode]
        if not rows:
            continue
        out[mode] = {"seconds": statistics.median(r["seconds"] for r in rows),
                     "peak_rss_gib": statistics.median(r["peak_rss_bytes"] for r in rows) / 2**30,
                     "growth_gib": statistics.median(r["peak_rss_bytes"] - r["base_rss_bytes"] for r in rows) / 2**30,
                     "rss_after_gib": statistics.median(r["rss_after_bytes"] for r in rows) / 2**30}
    ref = out.get("pycocotools")
    for row in out.values():
        if ref:
            row["time_ratio"] = row["seconds"] / ref["seconds"]
            row["peak_ratio"] = row["peak_rss_gib"] / ref["peak_rss_gib"]
            row["growth_ratio"] = row["growth_gib"] / ref["growth_gib"]
        for k, v in row.items():
            row[k] = round(v, 3)
    return out


def format_table(record: dict[str, Any]) -> str:
    """The summary as a text table, one row per mode."""
    lines = [f"{'':<26}{'time (s)':>9}{'x pycoco':>10}{'peak RSS (GiB)':>16}{'x pycoco':>10}"
             f"{'growth (GiB)':>14}{'x pycoco':>10}{'RSS after':>11}"]
    for mode, row in record["summary"].items():
        lines.append(f"{_LABELS[mode]:<26}{row['seconds']:>9.2f}{row.get('time_ratio', 1.0):>9.2f}x"
                     f"{row['peak_rss_gib']:>16.2f}{row.get('peak_ratio', 1.0):>9.2f}x{row['growth_gib']:>14.2f}"
                     f"{row.get('growth_ratio', 1.0):>9.2f}x{row['rss_after_gib']:>11.2f}")
    return "\n".join(lines)


def write_record(record: dict[str, Any], out_dir: str | os.PathLike[str], command: list[str]) -> Path:
    """Writes ``record`` (with the command that made it) as ``<out_dir>/startup_<images>x<annotations>.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f = record["file"]
    name = f"{f['images']}x{f['annotations']}" if "images" in f else Path(f["path"]).stem
    path = out / f"startup_{name}.json"
    path.write_text(json.dumps({"command": command, **record}, indent=2) + "\n")
    return path


def _main(argv: list[str]) -> int:
    """Child entry points: ``generate PATH [--images N --instances N --seed S]`` and
    ``measure MODE PATH [--cache DIR]``; each prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m resnet_det.studies.startup")
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("generate")
    g.add_argument("path")
    g.add_argument("--images", type=int, default=118287)
    g.add_argument("--instances", type=int, default=860001)
    g.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure")
    m.add_argument("mode", choices=MODES)
    m.add_argument("path")
    m.add_argument("--cache", default=None)
    args = parser.parse_args(argv)
    if args.what == "generate":
        result = generate_coco_file(args.path, images=args.images, instances=args.instances, seed=args.seed)
    else:
        result = measure(args.mode, args.path, args.cache)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
