"""The harness of `resnet-det benchmark` (resnet_det.studies.benchmark) on CPU: every row it promises, and
inference calls taken in turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import resnet_det.studies.benchmark as bm


class _Recorder(nn.Module):
    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def forward(self, images):
        self.log.append(self.name)
        return [{"boxes": torch.zeros(0, 4)} for _ in images]


def test_inference_calls_are_interleaved_after_warmup() -> None:
    log: list[str] = []
    models = {"a": _Recorder("a", log), "b": _Recorder("b", log)}
    out = bm.bench_infer_interleaved(models, [torch.zeros(3, 8, 8)], device=torch.device("cpu"), dtype="fp32",
                                     iters=3, warmup=2)
    assert log == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert set(out) == {"a", "b"} and all(ms > 0 for ms, _ in out.values())


@pytest.mark.usefixtures("single_thread")
def test_run_reports_train_and_infer_rows_for_both_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the benchmark's models at a tiny input size (the real tool uses torchvision's 800/1333)
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    from detection.models import build_faster_rcnn

    monkeypatch.setattr(bm, "build_ours", lambda arch, num_classes=91: build_faster_rcnn(
        num_classes=num_classes, backbone_name=bm.ARCHS[arch], backbone_norm="FrozenBN", backbone_freeze_at=2,
        input_min_size=(96,), input_max_size=96, input_test_min_size=96, input_test_max_size=96))
    monkeypatch.setattr(bm, "build_torchvision", lambda arch, num_classes=91: FasterRCNN(
        resnet_fpn_backbone(backbone_name=bm.ARCHS[arch], weights=None, norm_layer=FrozenBatchNorm2d,
                            trainable_layers=3), num_classes=num_classes, min_size=96, max_size=96))
    rows = bm.run(archs=["R18-FPN"], dtypes=["fp32"], device="cpu", height=96, width=96, train_batch=2,
                  infer_batches=[1, 2], iters=1, warmup=1, channels_last=False, compile_backbone=False,
                  which=["ours", "torchvision"], modes=["train", "infer"], prepared=True, log=lambda s: None)
    got = {(r.model, r.mode, r.batch) for r in rows}
    assert got == {("ours", "train", 2), ("torchvision", "train", 2)} | {
        (m, "infer", b) for m in ("ours", "ours-prepared", "torchvision") for b in (1, 2)}
    assert all(r.ms_per_iter > 0 and r.images_per_s == pytest.approx(r.batch * 1000 / r.ms_per_iter) for r in rows)
    lines = bm.speedups(rows)
    assert len(lines) == 5 and all("/torchvision images/s" in line for line in lines)
    path = bm.write_json(rows, tmp_path / "b.json", bm.environment("cpu"))
    data = json.loads(path.read_text())
    assert len(data["results"]) == len(rows) and data["environment"]["device"] == "cpu"
