"""The segmentation tasks (resnet_det.tasks.segmentation), and their evaluation through
`resnet_det.engine.launch.evaluate`: segm AP from pasted masks (pycocotools), mean IoU from `sem_seg` outputs
(model path of SemSegEvaluator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from resnet_det.config import load_config
from resnet_det.data.coco import CocoDetection
from resnet_det.engine.launch import build_model, evaluate
from resnet_det.evaluation import CONFUSION_MATRIX_FILENAME, COCOEvaluator, SemSegEvaluator
from resnet_det.tasks.segmentation import INSTANCE, PANOPTIC_FPN, SEMANTIC
from segmentation import MaskRCNN, PanopticFPN, SemanticFPN

REPO = Path(__file__).resolve().parents[2]


class Replay(nn.Module):
    """Answers each image with `make(target, image)` of the dataset's items in order (evaluate() runs the
    val set in order in one process), so the expected metrics are known exactly."""

    def __init__(self, dataset: CocoDetection, make) -> None:
        super().__init__()
        self.targets = iter([dataset[i][1] for i in range(len(dataset))])
        self.make = make

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.make(next(self.targets), img) for img in images]


def test_tasks_declare_their_dataset_fields_and_evaluators(tiny_coco_src: Path, tmp_path: Path):
    assert INSTANCE.with_masks and not INSTANCE.with_semantic
    assert SEMANTIC.with_semantic and not SEMANTIC.with_masks and PANOPTIC_FPN.with_semantic
    ds = CocoDetection(tiny_coco_src / "images", tiny_coco_src / "annotations.json", training=False)

    def kinds(task):
        return [(type(e), getattr(e, "iou_types", None)) for e in task.build_evaluators(ds, tmp_path)]

    assert kinds(INSTANCE) == [(COCOEvaluator, ("bbox", "segm"))]
    assert kinds(SEMANTIC) == [(SemSegEvaluator, None)]
    assert kinds(PANOPTIC_FPN) == [(COCOEvaluator, ("bbox",)), (SemSegEvaluator, None)]


@pytest.mark.parametrize(("name", "cls"), [("mask_rcnn_R_50_FPN", MaskRCNN), ("semantic_R_50_FPN", SemanticFPN),
                                           ("panoptic_fpn_R_50_FPN", PanopticFPN)])
def test_shapes_configs_build_their_task_models(name: str, cls: type) -> None:
    cfg = load_config(REPO / "configs" / "shapes" / f"{name}.yaml")
    task = {"instance": INSTANCE, "semantic": SEMANTIC, "panoptic_fpn": PANOPTIC_FPN}[cfg.model.task]
    model = build_model(cfg, task, 4)
    assert type(model) is cls and model.num_classes == 5
    assert cfg.train.max_time_minutes is not None and cfg.model.backbone.norm == "GN"
    assert cfg.model.input.min_size == (256,)


def test_coco_mask_rcnn_configs_are_paper_like():
    for name, backbone in (("mask_rcnn_R_50_FPN_1x", "resnet50"), ("mask_rcnn_R_101_FPN_1x", "resnet101")):
        cfg = load_config(REPO / "configs" / "coco" / f"{name}.yaml")
        m = cfg.model
        assert (m.task, m.backbone.name, m.backbone.norm, m.backbone.weights) == ("instance", backbone, "FrozenBN",
                                                                                  "imagenet")
        assert (m.mask.num_convs, m.mask.conv_dim, m.mask.pooler_resolution) == (4, 256, 14)
        assert (cfg.solver.ims_per_batch, cfg.solver.max_iter, cfg.solver.steps) == (16, 90000, (60000, 80000))


def test_perfect_instance_masks_give_segm_ap_one(tiny_coco_src: Path, tmp_path: Path) -> None:
    ds = CocoDetection(tiny_coco_src / "images", tiny_coco_src / "annotations.json", training=False, with_masks=True)

    def oracle(t: dict, img: torch.Tensor) -> dict[str, torch.Tensor]:
        k = len(t["boxes"])
        return {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.linspace(1.0, 0.5, k),
                "masks": t["masks"][:, None].float()}

    metrics = evaluate(Replay(ds, oracle), ds, INSTANCE, device=torch.device("cpu"),
                       output_dir=tmp_path, batch_size=4, num_workers=0, progress=False)
    # measured: 0 for both (AP exactly 1.0 on tiny_coco); abs 1e-12 for a backend's last bits
    assert metrics["segm"]["AP"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12)

    def shifted(t: dict, img: torch.Tensor) -> dict[str, torch.Tensor]:
        out = oracle(t, img)
        out["masks"] = torch.roll(out["masks"], shifts=6, dims=-1)  # right boxes, wrong masks
        return out

    metrics = evaluate(Replay(ds, shifted), ds, INSTANCE, device=torch.device("cpu"),
                       output_dir=tmp_path, batch_size=4, num_workers=0, progress=False)
    # measured: 0 (bbox AP exactly 1.0)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0, abs=1e-12) and metrics["segm"]["AP"] < 0.9


def test_semantic_evaluation_of_perfect_and_constant_predictions(tiny_coco_src: Path, tmp_path: Path) -> None:
    # COCO without semantic PNGs: sem_seg is painted from the instances (crowd = 255, ignored).
    ds = CocoDetection(tiny_coco_src / "images", tiny_coco_src / "annotations.json", training=False,
                       with_semantic=True)
    task = SEMANTIC
    # The prediction on ignored pixels does not matter: predict background there.
    perfect = evaluate(Replay(ds, lambda t, img: {"sem_seg": torch.where(t["sem_seg"] == 255, 0, t["sem_seg"])}), ds,
                       task, device=torch.device("cpu"), output_dir=tmp_path, num_workers=0, progress=False)
    assert perfect["sem_seg"]["mIoU"] == 1.0 and perfect["sem_seg"]["pAcc"] == 1.0
    assert (tmp_path / CONFUSION_MATRIX_FILENAME).stat().st_size > 1000

    constant = evaluate(Replay(ds, lambda t, img: {"sem_seg": torch.zeros(img.shape[-2:], dtype=torch.int64)}), ds,
                        task, device=torch.device("cpu"), output_dir=tmp_path, num_workers=0, progress=False)
    # Everything predicted as background (label 0). With n_c labelled pixels of class c and N = sum n_c:
    # IoU_0 = n_0 / (n_0 + N - n_0) = n_0 / N, IoU_c = 0 for every other class present, classes absent
    # from both are undefined (NaN, left out); so mIoU = (n_0 / N) / #{classes present, background
    # included}, and pAcc = n_0 / N.
    labels = np.concatenate([ds[i][1]["sem_seg"].numpy().ravel() for i in range(len(ds))])
    counts = np.bincount(labels[labels != 255], minlength=len(ds.class_names))
    n0, n = counts[0], counts.sum()
    present = int((counts > 0).sum())
    assert present >= 3
    # measured: 0 on each (the same ratio of pixel counts); abs 1e-12 for float summation order
    assert constant["sem_seg"]["pAcc"] == pytest.approx(n0 / n, abs=1e-12)
    assert constant["sem_seg"]["mIoU"] == pytest.approx(n0 / n / present, abs=1e-12)
