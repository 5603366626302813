"""``resnet-det analyze`` and ``resnet-det eval --analyze`` end to end: what is printed, the files
(a self-contained HTML page, the PNGs, metrics.json) and the one-line errors on bad input."""

from __future__ import annotations

import base64
import io
import json
import re
import sys
from pathlib import Path

import evalhelpers
import pytest

from resnet_det.cli import main
from resnet_det.evaluation.analysis import ANALYSIS_FILENAME, HTML_FILENAME, PLOTS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results_file(tmp_path_factory, tiny_coco_src) -> Path:
    gt = evalhelpers.quiet_coco(tiny_coco_src / "annotations.json")
    ids, outs = evalhelpers.synthetic_outputs(gt, seed=2)
    l2c, _ = evalhelpers.label_maps(gt)
    path = tmp_path_factory.mktemp("res") / "results.json"
    path.write_text(json.dumps(evalhelpers.direct_results(ids, outs, l2c, "bbox")))
    return path


@pytest.fixture(scope="module")
def analysis(tmp_path_factory, results_file, tiny_coco_src):
    """One run of the command (the plots take seconds): (exit code, printed text, output folder)."""
    out = tmp_path_factory.mktemp("analysis") / "out"
    capture = pytest.MonkeyPatch()  # capsys is function-scoped: capture by hand for the module's one run
    buf_out, buf_err = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", buf_out)
    capture.setattr(sys, "stderr", buf_err)
    try:
        rc = main(["analyze", "--results", str(results_file), "--annotations",
                   str(tiny_coco_src / "annotations.json"), "--output-dir", str(out), "--no-progress"])
    finally:
        capture.undo()
    return rc, buf_out.getvalue() + buf_err.getvalue(), out


def test_analyze_prints_tide_table_and_calibration(analysis):
    rc, printed, _ = analysis
    assert rc == 0
    assert "TIDE error breakdown (bbox, t_f=0.50, t_b=0.10)" in printed
    header = next(ln for ln in printed.splitlines() if ln.startswith("|") and "Cls" in ln)
    assert [c.strip() for c in header.strip("|").split("|")][1:] == ["Cls", "Loc", "Both", "Dupe", "Bkg", "Miss",
                                                                     "FP", "FN"]
    assert re.search(r"Calibration: D-ECE 0\.\d{4} over 10 confidence bins", printed)
    assert "analysis: matching took" in printed  # the stage times are logged


def test_analyze_writes_every_plot_and_metrics(analysis, results_file, tiny_coco_src):
    _, printed, out = analysis
    for name in PLOTS.values():
        assert (out / name).read_bytes()[:8] == PNG, name
    report = json.loads((out / ANALYSIS_FILENAME).read_text())
    stats, _, _ = evalhelpers.pycocotools_direct(tiny_coco_src / "annotations.json", results_file, "bbox")
    assert report["summary"]["AP50"] == stats[1] and report["tide"]["AP50"] == stats[1]
    assert report["summary"]["AP"] == stats[0]
    assert set(report["tide"]["dAP"]) == {"Cls", "Loc", "Both", "Dupe", "Bkg", "Miss", "FP", "FN"}
    assert all(v >= 0 for v in report["tide"]["dAP"].values())
    aps = [r["AP"] for r in report["per_category"] if r["AP"] is not None]
    assert aps == sorted(aps)  # worst first
    assert len(report["image_AP50_gain"]) == 16
    assert f"{report['tide']['AP50']:.4f}" in printed
    assert report["units"] == "fraction"


def test_html_is_one_self_contained_page(analysis):
    _, _, out = analysis
    page = (out / HTML_FILENAME).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # nothing to fetch: no script, no stylesheet link, no URL or file reference in src/href
    assert not re.search(r"<script|<link|(src|href)=\"(?!data:)", page)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(PLOTS)
    assert all(base64.b64decode(b)[:8] == PNG for b in images)
    for section in ("TIDE error breakdown", "Calibration", "Per-category AP, worst first", "Category confusion",
                    "Images that lose the most AP", "Precision-recall by object size"):
        assert section in page


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"image_id": 1}, "holds a JSON dict; COCO results are a JSON list"),
        ([], "is an empty list"),
        ([{"image_id": 1, "category_id": 1, "score": 0.5, "bbox": [0, 0, 1, 1]}], "not in the annotations' images"),
        ([{"image_id": 9, "category_id": 1, "score": 0.5}], "no result has a 'bbox' or a 'segmentation' key"),
        ("not json", "is not valid JSON"),
    ],
)
def test_bad_results_are_one_line_exit_2(tmp_path, tiny_coco_src, capsys, content, message):
    res = tmp_path / "r.json"
    res.write_text(content if isinstance(content, str) else json.dumps(content))
    rc = main(["analyze", "--results", str(res), "--annotations", str(tiny_coco_src / "annotations.json"),
               "--output-dir", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    line = next(ln for ln in err.splitlines() if ln.startswith("resnet-det analyze: error:"))
    assert message in line
    assert not (tmp_path / "out").exists()


def test_missing_files_and_bad_options(tmp_path, results_file, tiny_coco_src, capsys):
    gt = str(tiny_coco_src / "annotations.json")
    assert main(["analyze", "--results", str(tmp_path / "no.json"), "--annotations", gt,
                 "--output-dir", str(tmp_path)]) == 2
    assert "results file not found" in capsys.readouterr().err
    assert main(["analyze", "--results", str(results_file), "--annotations", str(tmp_path / "no.json"),
                 "--output-dir", str(tmp_path)]) == 2
    assert "annotations file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--results", str(results_file), "--annotations", gt, "--output-dir", str(tmp_path),
              "--calibration-bins", "0"])
    assert e.value.code == 2
    assert "--calibration-bins must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", "--results", str(results_file), "--annotations", gt])  # no --output-dir
    capsys.readouterr()


def test_eval_analyze_writes_the_analysis_next_to_the_metrics(tmp_path, results_file, tiny_coco_src, capsys,
                                                              monkeypatch):
    import resnet_det.evaluation.analysis as analysis_module

    monkeypatch.setattr(analysis_module, "write_plots", lambda report, out: {})  # plots: tested above
    gt = str(tiny_coco_src / "annotations.json")
    rc = main(["eval", "--results", str(results_file), "--annotations", gt, "--output-dir", str(tmp_path),
               "--analyze", "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0
    assert (tmp_path / "metrics.json").is_file()  # the evaluation's own
    report = json.loads((tmp_path / "analysis" / ANALYSIS_FILENAME).read_text())
    assert report["summary"]["AP50"] == json.loads((tmp_path / "metrics.json").read_text())["bbox"]["summary"]["AP50"]
    assert "TIDE error breakdown" in printed.out + printed.err
    with pytest.raises(SystemExit):
        main(["eval", "--results", str(results_file), "--annotations", gt, "--analyze"])
    assert "--analyze needs --output-dir" in capsys.readouterr().err


def test_progress_bar_on_a_terminal_only(results_file, tiny_coco_src, monkeypatch, capsys):
    from resnet_det.evaluation.analysis import analyze_results
    from resnet_det_common import logs

    gt = tiny_coco_src / "annotations.json"
    analyze_results(results_file, gt, progress=True)
    assert "analyze:" not in capsys.readouterr().err  # stderr captured: not a terminal, no bar
    monkeypatch.setattr(logs, "stderr_is_terminal", lambda: True)
    analyze_results(results_file, gt, progress=True)
    assert re.search(r"analyze: .*\d+/\d+", capsys.readouterr().err)  # tqdm's "analyze: ... 6/8"
    analyze_results(results_file, gt, progress=False)
    assert "analyze:" not in capsys.readouterr().err
