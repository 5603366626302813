"""The analysis' outputs: console tables, PNG plots (matplotlib's Agg canvas, no pyplot state) and one
self-contained HTML page (plots inline as base64 PNG, no script, no external resource)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PLOTS", "format_tide_table", "render_html", "write_plots"]

PLOTS: dict[str, str] = {
    "tide": "tide_errors.png",
    "reliability": "reliability.png",
    "pr_by_size": "pr_by_size.png",
    "per_category": "per_category_ap.png",
    "confusion": "confusion_matrix.png",
    "worst_images": "worst_images.png",
}
"""Plot key -> file name in the output folder."""

_TIDE_NAMES = {"Cls": "classification", "Loc": "localisation", "Both": "both cls+loc", "Dupe": "duplicate",
               "Bkg": "background", "Miss": "missed", "FP": "false positives", "FN": "false negatives"}
_COLORS = {"Cls": "#e15759", "Loc": "#f28e2b", "Both": "#b07aa1", "Dupe": "#59a14f", "Bkg": "#4e79a7",
           "Miss": "#edc948", "FP": "#9c755f", "FN": "#76b7b2"}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def pipe_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A Markdown pipe table with aligned columns."""
    cells = [[str(h) for h in header]] + [[_fmt(v, digits) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|")
    return "\n".join(lines)


def format_tide_table(report: Mapping[str, Any]) -> str:
    """TIDE's table (dAP50 and counts per error type) and the calibration line, as printed."""
    t = report["tide"]
    types = list(t["dAP"])
    head = (f"TIDE error breakdown ({report['iou_type']}, t_f={t['t_f']:.2f}, t_b={t['t_b']:.2f}): "
            f"AP50 {t['AP50']:.4f} over {report['num_images']} images, {report['num_detections_counted']} "
            "counted detections; dAP50 = AP50 gained by fixing that error type alone (fractions)")
    table = pipe_table(["", *types], [["dAP50", *[t["dAP"][k] for k in types]],
                                      ["count", *[t["counts"][k] for k in types]]])
    c = report["calibration"]
    if c.get("D-ECE") is None:
        cal = f"Calibration: not computed ({c.get('note', 'no detections')})"
    else:
        cal = (f"Calibration: D-ECE {c['D-ECE']:.4f} over {len(c['count'])} confidence bins, "
               f"{c['num_detections']} detections (correct = TP at IoU {c['iou_thr']:.2f})")
    return "\n".join([head, table, cal])


# ----------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100)


def _plot_tide(report: Mapping[str, Any], path: Path) -> None:
    t = report["tide"]
    fig = _figure(9.0, 3.8)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.4]})
    main = [k for k in t["dAP"] if k not in ("FP", "FN")]
    for ax, keys, title in ((ax1, main, "main errors"), (ax2, ["FP", "FN"], "special errors")):
        vals = [t["dAP"][k] for k in keys]
        ax.barh(range(len(keys)), vals, color=[_COLORS[k] for k in keys])
        ax.set_yticks(range(len(keys)), [f"{k} ({_TIDE_NAMES[k]})" for k in keys], fontsize=8)
        ax.invert_yaxis()
        top = max([*vals, 1e-3])
        ax.set_xlim(0, top * 1.3)
        for i, v in enumerate(vals):
            ax.text(v + top * 0.02, i, f"{v:.4f}", va="center", fontsize=8)
        ax.set_xlabel("dAP50 (fraction)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"TIDE ({report['iou_type']}): AP50 = {t['AP50']:.4f}; AP50 gained by fixing each error type",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def _plot_reliability(report: Mapping[str, Any], path: Path) -> bool:
    c = report["calibration"]
    if c.get("D-ECE") is None:
        return False
    edges = np.asarray(c["bin_edges"])
    prec = np.asarray([np.nan if v is None else v for v in c["precision"]], dtype=float)
    conf = np.asarray([np.nan if v is None else v for v in c["confidence"]], dtype=float)
    count = np.asarray(c["count"])
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig = _figure(5.6, 6.0)
    ax, axh = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ok = count > 0
    ax.bar(centers[ok], prec[ok], width=width[ok] * 0.95, color="#4e79a7", edgecolor="white", label="precision")
    lo, hi = np.minimum(prec, conf), np.maximum(prec, conf)
    ax.bar(centers[ok], (hi - lo)[ok], bottom=lo[ok], width=width[ok] * 0.95, color="#e15759", alpha=0.35,
           hatch="//", edgecolor="#e15759", label="gap to mean confidence")
    ax.plot(conf[ok], conf[ok], "o", color="black", markersize=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"precision (TP at IoU {c['iou_thr']:.2f})")
    ax.set_title(f"Reliability diagram ({report['iou_type']}): D-ECE = {c['D-ECE']:.4f}\n"
                 f"{c['num_detections']} detections, {len(count)} bins", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    axh.bar(centers, count, width=width * 0.95, color="#9c755f")
    axh.set_xlabel("confidence (score)")
    axh.set_ylabel("detections")
    axh.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def _plot_pr_by_size(report: Mapping[str, Any], path: Path) -> bool:
    curves = report["pr_by_size"]
    if not any(v["precision"] is not None for v in curves.values()):
        return False
    fig = _figure(6.0, 5.0)
    ax = fig.subplots()
    styles = {"all": ("-", "black"), "small": ("--", "#e15759"), "medium": ("-.", "#f28e2b"),
              "large": (":", "#4e79a7")}
    for area, v in curves.items():
        if v["precision"] is None:
            continue
        style, color = styles[area]
        ax.plot(v["recall"], v["precision"], style, color=color, linewidth=2,
                label=f"{area}: AP50={v['AP50']:.3f} ({v['num_categories']} cat., {v['num_gt']} gt)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (interpolated, mean over categories)")
    ax.set_title(f"Precision-recall at IoU 0.50 by object size ({report['iou_type']})", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def _plot_per_category(report: Mapping[str, Any], path: Path) -> bool:
    rows = [r for r in report["per_category"] if r["AP"] is not None]
    if not rows:
        return False
    n = len(rows)
    height = max(2.5, 0.9 + 0.16 * n)
    fig = _figure(7.0, height)
    ax = fig.subplots()
    # fixed margins: tight_layout measures every label several times (seconds with 80 categories)
    fig.subplots_adjust(left=0.25, right=0.97, top=1 - 0.45 / height, bottom=0.5 / height)
    y = np.arange(n)
    ax.barh(y, [r["AP50"] for r in rows], color="#a0cbe8", label="AP50")
    ax.barh(y, [r["AP"] for r in rows], color="#4e79a7", height=0.5, label="AP (IoU .50:.95)")
    ax.set_yticks(y, [r["category"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("AP (fraction)")
    ax.set_title(f"Per-category AP, worst first ({report['iou_type']})", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path)
    return True


def _plot_confusion(report: Mapping[str, Any], path: Path) -> bool:
    cm = report["confusion"]
    mat = np.asarray(cm["matrix"], dtype=float)
    names = list(cm["categories"])
    k = len(names)
    # rows: the categories with gt (+ background); columns: those that occur in any row (+ missed)
    row_cats = np.flatnonzero(mat[:k].sum(1) > 0)
    col_cats = np.flatnonzero(mat[:, :k].sum(0) > 0)
    if row_cats.size + col_cats.size == 0:
        return False
    rows = np.r_[row_cats, k]
    cols = np.r_[col_cats, k]
    sub = mat[np.ix_(rows, cols)]
    norm = sub / np.maximum(sub.sum(axis=1, keepdims=True), 1)
    labels_r = [names[i] for i in row_cats] + ["background"]
    labels_c = [names[i] for i in col_cats] + ["missed"]
    cell = 0.15  # inches per row / column; the margins hold the tick labels and the colour bar
    width, height = len(cols) * cell + 2.6, len(rows) * cell + 2.0
    fig = _figure(width, height)
    ax = fig.subplots()
    from matplotlib.colors import PowerNorm

    # a square-root scale: the off-diagonal shares (a few percent) stay visible next to the diagonal
    im = ax.imshow(norm, cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    n_max = max(len(rows), len(cols))
    fs = 8 if n_max <= 20 else 6 if n_max <= 45 else 5
    ax.set_xticks(range(len(cols)), labels_c, rotation=90, fontsize=fs)
    ax.set_yticks(range(len(rows)), labels_r, fontsize=fs)
    ax.set_xlabel("predicted category (last column: missed)")
    ax.set_ylabel("ground-truth category (last row: background false positives)")
    ax.set_title(f"Confusion at IoU 0.50 ({report['iou_type']}), each row normalised to 1 "
                 "(square-root colour scale)", fontsize=10)
    fig.subplots_adjust(left=1.1 / width, bottom=1.3 / height, right=1 - 1.3 / width, top=1 - 0.5 / height)
    cax = fig.add_axes((1 - 1.1 / width, 1.3 / height, 0.15 / width, 1 - 1.8 / height))
    fig.colorbar(im, cax=cax)
    fig.savefig(path)
    return True


def _plot_worst_images(report: Mapping[str, Any], path: Path) -> bool:
    rows = report["worst_images"]
    if not rows:
        return False
    n = len(rows)
    fig = _figure(7.0, max(2.5, 0.8 + 0.22 * n))
    ax = fig.subplots()
    ax.barh(range(n), [r["AP50_gain"] for r in rows], color="#e15759")
    ax.set_yticks(range(n), [f"{r['image_id']}  {r['file_name']}" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("AP50 gained by fixing this image alone (fraction)")
    ax.set_title("Images that lose the most AP50", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_plots(report: Mapping[str, Any], output_dir: Path) -> dict[str, Path]:
    """Writes the PNG plots into ``output_dir``; returns ``{key: path}`` of those written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    makers = {"tide": _plot_tide, "reliability": _plot_reliability, "pr_by_size": _plot_pr_by_size,
              "per_category": _plot_per_category, "confusion": _plot_confusion,
              "worst_images": _plot_worst_images}
    for key, make in makers.items():
        path = output_dir / PLOTS[key]
        if make(report, path) is not False:
            written[key] = path
    return written


# ----------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;height:auto;display:block;
margin:.6em 0}p.note{color:#555;font-size:.9em;max-width:60em}
.scroll{max-height:32em;overflow:auto;display:inline-block}
"""


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: Sequence[int] = (0,),
                digits: int = 4) -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i in left else ""
        return f"<{tag}{cls}>{html.escape(_fmt(v, digits))}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: Mapping[str, Any], plots: Mapping[str, Path]) -> str:
    """The analysis as one self-contained HTML page (plots inline)."""
    t, c = report["tide"], report["calibration"]
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>Detection analysis ({html.escape(report['iou_type'])})</title><style>{_CSS}</style></head><body>",
        f"<h1>Detection analysis: {html.escape(report['iou_type'])}</h1>",
        f"<p>Results <code>{html.escape(str(report['results']))}</code> against "
        f"<code>{html.escape(str(report['annotations']))}</code>: {report['num_images']} images, "
        f"{report['num_gt']} ground-truth instances ({report['num_crowd']} crowd), {report['num_detections']} "
        f"detections ({report['num_detections_uncounted']} beyond the {report['max_dets']} best per image and "
        "category are not counted, as in COCO). All numbers are fractions; every one is in "
        "<code>metrics.json</code>.</p>",
        _html_table(["AP (IoU .50:.95)", "AP50", "AP75", "D-ECE"],
                    [[report["summary"]["AP"], report["summary"]["AP50"], report["summary"]["AP75"],
                      c.get("D-ECE")]], left=()),
        "<h2>TIDE error breakdown</h2>",
        "<p class=\"note\">Bolya et al., ECCV 2020, on COCO's matching at IoU t_f = "
        f"{t['t_f']:.2f} (background t_b = {t['t_b']:.2f}). dAP50: the AP50 gained when an oracle fixes "
        "only that error type (Cls/Loc: the detection becomes a true positive of its target, or is "
        "suppressed if that target is taken; Both/Dupe/Bkg: suppressed; Miss: the gt is dropped; FP: every "
        "false positive suppressed; FN: every unmatched gt dropped).</p>",
        _html_table(["", *t["dAP"]], [["dAP50", *t["dAP"].values()], ["count", *t["counts"].values()]]),
    ]
    if "tide" in plots:
        parts.append(_img_tag(plots["tide"], "TIDE error breakdown"))
    parts.append("<h2>Calibration</h2>")
    if c.get("D-ECE") is None:
        parts.append(f"<p>Not computed: {html.escape(str(c.get('note', 'no detections')))}.</p>")
    else:
        parts.append(
            f"<p class=\"note\">D-ECE (Küppers et al., CVPR-W 2020), confidence only: the detection-weighted "
            f"mean of |precision - mean confidence| over {len(c['count'])} equal-width score bins; a detection is "
            f"correct when it is a true positive at IoU {c['iou_thr']:.2f}. D-ECE = {c['D-ECE']:.4f}.</p>")
        edges = c["bin_edges"]
        parts.append(_html_table(
            ["score bin", "detections", "mean confidence", "precision", "gap"],
            [[f"[{edges[i]:.2f}, {edges[i + 1]:.2f}{']' if i == len(c['count']) - 1 else ')'}", c["count"][i],
              c["confidence"][i], c["precision"][i],
              None if c["precision"][i] is None else c["precision"][i] - c["confidence"][i]]
             for i in range(len(c["count"]))]))
        if "reliability" in plots:
            parts.append(_img_tag(plots["reliability"], "reliability diagram"))
    parts.append("<h2>Precision-recall by object size (IoU 0.50)</h2>")
    sizes = report["pr_by_size"]
    parts.append(_html_table(["area", "AP50", "categories", "gt"],
                             [[a, v["AP50"], v["num_categories"], v["num_gt"]] for a, v in sizes.items()]))
    if "pr_by_size" in plots:
        parts.append(_img_tag(plots["pr_by_size"], "precision-recall by size"))
    parts.append("<h2>Per-category AP, worst first</h2>")
    cat_rows = [[r["category"], r["id"], r["AP"], r["AP50"], r["AP75"], r["num_gt"], r["num_detections"],
                 r["false_positives"], r["missed"]] for r in report["per_category"]]
    parts.append('<div class="scroll">' + _html_table(
        ["category", "id", "AP", "AP50", "AP75", "gt", "detections", "FP@.5", "FN@.5"], cat_rows) + "</div>")
    if "per_category" in plots:
        parts.append(_img_tag(plots["per_category"], "per-category AP"))
    parts.append("<h2>Category confusion (IoU 0.50)</h2>")
    parts.append(
        "<p class=\"note\">Rows: ground-truth category (a gt counts in its own column when matched, in the "
        "column of the highest-scoring false positive of another category covering it at IoU >= 0.5, else in "
        "'missed'); last row: false positives covering no gt at IoU >= 0.5, by predicted category.</p>")
    top = report["confusion"]["top_confusions"]
    if top:
        parts.append(_html_table(["ground truth", "predicted as", "gts", "share of that category's gts"],
                                 [[r["gt"], r["predicted"], r["count"], r["fraction"]] for r in top], left=(0, 1)))
    if "confusion" in plots:
        parts.append(_img_tag(plots["confusion"], "confusion matrix"))
    parts.append("<h2>Images that lose the most AP</h2>")
    parts.append(
        "<p class=\"note\">AP50 gain of the whole set if only that image were fixed: its false positives "
        "removed and its missed gts not counted, its true positives kept (TIDE's FP and FN oracles on one "
        "image). Exact 101-point COCO AP; never negative.</p>")
    parts.append(_html_table(
        ["image id", "file", "AP50 gain", "gt", "TP", "FP", "missed"],
        [[r["image_id"], r["file_name"], r["AP50_gain"], r["num_gt"], r["tp"], r["fp"], r["missed"]]
         for r in report["worst_images"]], left=(1,), digits=5))
    if "worst_images" in plots:
        parts.append(_img_tag(plots["worst_images"], "worst images"))
    parts.append("</body></html>")
    return "\n".join(parts)
