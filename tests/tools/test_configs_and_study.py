"""Every shipped config loads and builds; the paper study runs end to end (tiny, on shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detection.config import load_config
from detection.engine.launch import build_model
from detection.engine.study import run_study, summarize

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not p.name.endswith("_base.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_loads_and_builds(path: Path) -> None:
    import segmentation  # noqa: F401  (registers the segmentation tasks)

    cfg = load_config(path, ["model.backbone_weights=null"])
    model = build_model(cfg, cfg.model.num_classes or 80)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert model.num_classes == (cfg.model.num_classes or 80) + 1


def test_paper_configs_differ_only_in_backbone() -> None:
    from detection.config import config_to_dict

    a = config_to_dict(load_config(REPO / "configs/paper/faster_rcnn_VGG16_C4.yaml"))
    b = config_to_dict(load_config(REPO / "configs/paper/faster_rcnn_R_101_C4.yaml"))
    a["train"].pop("output_dir"), b["train"].pop("output_dir")
    diff = {k for k in a["model"] if a["model"][k] != b["model"][k]}
    assert diff == {"backbone"} and {k: v for k, v in a.items() if k != "model"} == {
        k: v for k, v in b.items() if k != "model"}


def test_summary_relative_gain_matches_paper() -> None:
    s = summarize({"vgg16": {"AP": 0.212, "AP50": 0.415}, "resnet101": {"AP": 0.272, "AP50": 0.484}})
    assert s["relative_gain"] == pytest.approx(0.283, abs=1e-3)
    assert s["paper_relative_gain"] == pytest.approx(s["relative_gain"])


def test_paper_study_runs_both_backbones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_DET_CACHE", str(tmp_path / "cache"))
    tiny = ["model.backbone_weights=null", "model.norm=GN", "model.backbone_width=8", "model.min_size=[96]",
            "model.max_size=96", "model.test_min_size=96", "model.test_max_size=96", "model.roi.pooler_type=roi_align",
            "data.shapes_num_train=4", "data.shapes_num_val=2", "data.shapes_image_size=96", "data.num_workers=0",
            "solver.ims_per_batch=2", "solver.max_iter=2", "solver.steps=[1]", "train.device=cpu", "train.amp=off",
            "train.log_period=1", "model.rpn.pre_nms_topk_train=200", "model.rpn.post_nms_topk_train=50",
            "model.rpn.pre_nms_topk_test=100", "model.rpn.post_nms_topk_test=20", "model.roi.batch_size_per_image=16"]
    summary = run_study(tiny, configs=[str(REPO / "configs/paper/faster_rcnn_VGG16_C4.yaml"),
                                       str(REPO / "configs/paper/faster_rcnn_R_101_C4.yaml")],
                        output_dir=str(tmp_path / "study"), progress=False)
    assert [r["backbone"] for r in summary["rows"]] == ["vgg16", "resnet101"]
    assert all(r["AP"] is not None for r in summary["rows"])
    assert json.loads((tmp_path / "study" / "study.json").read_text())["rows"][0]["paper_AP"] == 0.212
    assert (tmp_path / "study" / "study.png").stat().st_size > 1000
