"""Every shipped config loads and builds (the paper study's tests: tests/studies/test_paper_study.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_det.cli._library import get_task
from resnet_det.config import load_config
from resnet_det.engine.launch import build_model

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not p.name.endswith("_base.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_loads_and_builds(path: Path) -> None:
    cfg = load_config(path, ["model.backbone.weights=null"])
    model = build_model(cfg, get_task(cfg.model.task), cfg.model.num_classes or 80)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert model.num_classes == (cfg.model.num_classes or 80) + 1


def test_paper_configs_differ_only_in_backbone() -> None:
    from resnet_det.config import config_to_dict

    a = config_to_dict(load_config(REPO / "configs/paper/faster_rcnn_VGG16_C4.yaml"))
    b = config_to_dict(load_config(REPO / "configs/paper/faster_rcnn_R_101_C4.yaml"))
    a["train"].pop("output_dir"), b["train"].pop("output_dir")
    diff = {k for k in a["model"] if a["model"][k] != b["model"][k]}
    backbone_diff = {k for k in a["model"]["backbone"] if a["model"]["backbone"][k] != b["model"]["backbone"][k]}
    assert diff == {"backbone"} and backbone_diff == {"name"} and {k: v for k, v in a.items() if k != "model"} == {
        k: v for k, v in b.items() if k != "model"}
