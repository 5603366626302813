"""tools/infer.py: images and folders in, a COCO results JSON and rendered images out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from detection.models import build_faster_rcnn
from resnet_det.config import load_config
from resnet_det.engine.inference import render

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/shapes/faster_rcnn_R_50_FPN.yaml")
TINY = ["model.backbone.name=resnet18", "model.backbone.width=8", "model.backbone.norm=GN", "model.fpn.channels=16",
        "model.roi.fc_dim=32", "model.input.min_size=[96]", "model.input.max_size=96", "model.input.test_min_size=96",
        "model.input.test_max_size=96", "model.num_classes=3"]


def _tool():
    spec = importlib.util.spec_from_file_location("infer_tool", REPO / "tools" / "infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_infer_writes_results_and_renders(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_faster_rcnn(load_config(CONFIG, TINY).model)
    # A strong background-free classifier bias so detections exist above the score threshold.
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.bias.copy_(torch.tensor([-5.0, 3.0, 0.0, 0.0]))
    ckpt = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("000000000007.jpg", "cat.png"):
        Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "out"
    code = _tool().main([CONFIG, *TINY, "--checkpoint", str(ckpt), "--input", str(folder), "--output", str(out),
                         "--score-thresh", "0.0", "--class-names", str(_names(tmp_path))])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results, "the biased model must produce detections"
    assert {r["image_id"] for r in results} <= {7, 1}  # COCO-style names give their id, others their index
    assert all(len(r["bbox"]) == 4 and r["category_id"] in (1, 2, 3) for r in results)
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["000000000007.jpg", "cat.jpg"]


def _names(tmp_path: Path) -> Path:
    p = tmp_path / "names.json"
    p.write_text(json.dumps(["background", "a", "b", "c"]))
    return p


def test_infer_missing_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    model = build_faster_rcnn(load_config(CONFIG, TINY).model)
    ckpt = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    code = _tool().main([CONFIG, *TINY, "--checkpoint", str(ckpt), "--input", str(tmp_path / "nope.jpg"),
                         "--output", str(tmp_path / "o")])
    assert code == 2 and "nope.jpg" in capsys.readouterr().err


def test_render_draws_boxes_and_masks() -> None:
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    masks = torch.zeros(1, 1, 40, 60)
    masks[0, 0, 10:20, 10:30] = 1.0
    out = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 20.0]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([1]), "masks": masks}
    drawn = np.asarray(render(image, out, class_names=["bg", "thing"], score_thresh=0.5))
    assert drawn[15, 20].sum() > 0, "the mask is blended in"
    assert drawn[35, 55].sum() == 0, "pixels away from the detection are untouched"
    low = {**out, "scores": torch.tensor([0.1])}
    assert np.asarray(render(image, low, score_thresh=0.5)).sum() == 0, "below threshold: nothing drawn"


def test_results_json_goes_through_the_projects_one_coco_converter(tmp_path: Path, monkeypatch) -> None:
    """infer's results.json is what the evaluation's converter writes (xywh, category ids), not a copy."""
    import resnet_det.engine.inference as inference

    seen = []
    real = inference.instances_to_coco_json

    def spy(*args, **kwargs):
        seen.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "instances_to_coco_json", spy)
    torch.manual_seed(0)
    model = build_faster_rcnn(load_config(CONFIG, TINY).model)
    with torch.no_grad():
        model.roi_heads.predictor.cls_score.bias.copy_(torch.tensor([-5.0, 3.0, 0.0, 0.0]))
    img = tmp_path / "000000000042.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(img)
    path = inference.run_inference(model, [img], tmp_path / "o", device=torch.device("cpu"),
                                   label_to_cat_id={1: 10, 2: 20, 3: 30}, score_thresh=0.0, progress=False)
    results = json.loads(path.read_text())
    assert seen == [42] and results
    assert all(r["category_id"] in (10, 20, 30) and r["image_id"] == 42 and len(r["bbox"]) == 4 for r in results)


def test_show_gt_draws_ground_truth_beside_predictions(tmp_path: Path, monkeypatch, capsys) -> None:
    """--show-gt N: N val images, ground truth (left half) and predictions (right half), nothing else needed."""
    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path / "cache"))
    data = ["data.shapes_num_train=4", "data.shapes_num_val=3", "data.shapes_image_size=96", "data.num_workers=0"]
    torch.manual_seed(0)
    model = build_faster_rcnn(load_config(CONFIG, TINY).model)
    ckpt = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    out = tmp_path / "out"
    code = _tool().main([CONFIG, *TINY, *data, "--checkpoint", str(ckpt), "--show-gt", "2", "--output", str(out),
                         "--no-progress"])
    assert code == 0, capsys.readouterr().err
    files = sorted((out / "vis_gt").iterdir())
    assert len(files) == 2
    drawing = np.asarray(Image.open(files[0]))
    assert drawing.shape[1] > 2 * 96 - 1  # two 96-px images side by side (and a gap)
    left, right = drawing[:, :96].astype(int), drawing[:, -96:].astype(int)
    assert np.abs(left - right).sum() > 0, "the ground truth is drawn on the left only"
