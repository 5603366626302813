"""tools/eval.py, results mode, end to end (in-process through main(argv) and once as a subprocess)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import evalhelpers as H
import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "eval.py"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools.*")


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("resnet_det_tools_eval", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results_file(tmp_path_factory, tiny_coco_src):
    gt = H.quiet_coco(tiny_coco_src / "annotations.json")
    ids, outs = H.synthetic_outputs(gt, seed=0, with_masks=True)
    l2c, _ = H.label_maps(gt)
    bbox = H.direct_results(ids, outs, l2c, "bbox")
    segm = H.direct_results(ids, outs, l2c, "segm")
    both = [{**b, "segmentation": s["segmentation"]} for b, s in zip(bbox, segm)]
    path = tmp_path_factory.mktemp("res") / "results.json"
    path.write_text(json.dumps(both))
    return path


def test_results_mode_prints_tables_writes_outputs_exit_0(tool, results_file, gt_path, tmp_path, capsys):
    out = tmp_path / "out"
    rc = tool.main(["--results", str(results_file), "--annotations", str(gt_path), "--output-dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    lines = H.table_lines(printed)
    assert len(lines) == 24  # bbox and segm inferred from the results
    _, expected_bbox, _ = H.pycocotools_direct(gt_path, results_file, "bbox")
    segm_only = [{k: v for k, v in r.items() if k != "bbox"} for r in json.loads(results_file.read_text())]
    _, expected_segm, _ = H.pycocotools_direct(gt_path, segm_only, "segm")
    assert lines == expected_bbox + expected_segm
    assert "Per-category bbox AP" in printed and "| person" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert set(report) >= {"bbox", "segm"}
    assert (out / "pr_curve_bbox.png").is_file() and (out / "pr_curve_segm.png").is_file()


def test_results_mode_iou_types_flag(tool, results_file, gt_path, capsys):
    assert (
        tool.main(["--results", str(results_file), "--annotations", str(gt_path), "--iou-types", "segm"]) == 0
    )
    printed = capsys.readouterr().out
    assert len(H.table_lines(printed)) == 12 and "COCO evaluation (segm)" in printed
    assert "COCO evaluation (bbox)" not in printed


def test_subprocess_exit_codes_and_messages(results_file, gt_path, tmp_path):
    ok = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--results",
            str(results_file),
            "--annotations",
            str(gt_path),
            "--iou-types",
            "bbox",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    stats, expected, _ = H.pycocotools_direct(gt_path, results_file, "bbox")
    assert H.table_lines(ok.stdout) == expected and stats[0] > 0.1

    missing = tmp_path / "nope.json"
    bad = subprocess.run(
        [sys.executable, str(TOOL), "--results", str(missing), "--annotations", str(gt_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"eval.py: error: results file not found: {missing}"
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "results file not found"),
        ("{oops", "is not valid JSON"),
        ("[]", "is an empty list"),
        ('{"a": 1}', "holds a JSON dict"),
        ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]', "image ids [1]"),
    ],
)
def test_bad_input_exit_2_with_one_line(tool, gt_path, tmp_path, capsys, content, message):
    res = tmp_path / "r.json"
    if content is not None:
        res.write_text(content)
    rc = tool.main(["--results", str(res), "--annotations", str(gt_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("eval.py: error: ") and message in err and err.count("\n") == 1


def test_missing_annotations_and_usage_errors(tool, results_file, tmp_path, capsys):
    assert tool.main(["--results", str(results_file), "--annotations", str(tmp_path / "gt.json")]) == 2
    assert "annotations file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        tool.main(["--results", str(results_file)])
    assert e.value.code == 2 and "needs both --results and --annotations" in capsys.readouterr().err


TINY = ["model.backbone.name=resnet18", "model.backbone.width=8", "model.backbone.norm=GN", "model.fpn.channels=16",
        "model.roi.fc_dim=32", "model.input.min_size=[96]", "model.input.max_size=96", "model.input.test_min_size=96",
        "model.input.test_max_size=96", "data.shapes_num_train=4", "data.shapes_num_val=3",
        "data.shapes_image_size=96", "data.num_workers=0"]


def test_checkpoint_mode_evaluates_saved_weights(tool, tmp_path, monkeypatch, capsys):
    """A checkpoint of the config's model is evaluated on the val split: the COCO table and its files."""
    import torch
    from safetensors.torch import save_file

    from detection.models import build_faster_rcnn
    from resnet_det.config import load_config

    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path / "cache"))
    config = str(Path(__file__).resolve().parents[2] / "configs/shapes/faster_rcnn_R_50_FPN.yaml")
    cfg = load_config(config, TINY)
    torch.manual_seed(0)
    model = build_faster_rcnn(cfg.model.replace(num_classes=4))
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    out = tmp_path / "out"
    assert tool.main([config, "--checkpoint", str(ckpt), "--output-dir", str(out), *TINY]) == 0
    captured = capsys.readouterr()
    # The table is logged (stderr) when the tool sets up logging, printed (stdout) when nothing is set up.
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in captured.out + captured.err
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert "bbox" in json.dumps(metrics)
    assert (out / "eval" / "pr_curve_bbox.png").is_file()


def test_checkpoint_mode_missing_file(tool, capsys):
    assert tool.main(["configs/shapes/faster_rcnn_R_50_FPN.yaml", "--checkpoint", "/no/such/model.pth"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_results_mode_backend_flag(tool, results_file, gt_path, capsys):
    for backend in ("pycocotools", "faster-coco-eval"):
        argv = ["--results", str(results_file), "--annotations", str(gt_path), "--iou-types", "bbox"]
        assert tool.main([*argv, "--backend", backend]) == 0
        printed = capsys.readouterr().out
        assert f"detections ({backend}):" in printed
        _, expected, _ = H.pycocotools_direct(gt_path, results_file, "bbox")
        assert H.table_lines(printed) == expected  # the printed table (3 decimals) is pycocotools' with both
