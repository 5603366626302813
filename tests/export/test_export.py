"""Export parity: ONNX Runtime (one InferenceSession for every image) and a saved and reloaded `torch.export`
program give the eager model's detections on the 16 real tiny-COCO images at their own sizes (301x450 to
640x640): labels equal, boxes within 0.01 px, scores within 1e-4, near-ties matched by IoU (`parity.py`).

Random weights give few confident detections, so each model's classifier is first re-drawn to spread the scores
(`parity.spread_classifier`) and every test asserts how many detections it compared.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from detection import build_faster_rcnn, fasterrcnn_resnet50_fpn
from detection import export as det_export
from segmentation import build_mask_rcnn, maskrcnn_resnet50_fpn
from segmentation import export as seg_export

from .parity import match_detections, spread_classifier

SMALL = dict(input_test_min_size=320, input_test_max_size=512)  # the images keep their own sizes; the model resizes


def _as_float(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def _prepare(model, images, *, seed: int = 0):
    model.eval()
    spread_classifier(model, _as_float(images[0][1]), seed=seed)
    return model


def _check_parity(model, images, run, *, min_detections: int) -> int:
    """Compare `run(image) -> (boxes, scores, labels[, masks])` with the eager model on every image."""
    total, ties, problems = 0, 0, []
    names = ["boxes", "scores", "labels", "masks"]
    cap, nms_thresh = model.roi_heads.detections_per_img, model.roi_heads.nms_thresh
    for name, image in images:
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in model([_as_float(image)])[0].items()}
        got = dict(zip(names, [np.asarray(v) for v in run(image)]))
        if "masks" in ref:
            assert got["masks"].shape == ref["masks"].shape == (len(ref["scores"]), 1, *image.shape[:2]), name
        total += len(ref["scores"])
        found, near = match_detections(ref, got, cap=cap, nms_thresh=nms_thresh)
        problems += [f"{name} {image.shape[:2]}: {p}" for p in found]
        ties += near
    assert not problems, "\n".join(problems[:20])
    assert total >= min_detections, f"only {total} detections compared"
    # Near-ties are rare exchanges, not a way around the comparison.
    assert ties <= max(2, total // 100), f"{ties} near-tied detections of {total}"
    print(f"{total} detections compared, {ties} near-ties")
    return total


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_runner(session: ort.InferenceSession):
    return lambda image: session.run(None, {"image": image})


@pytest.mark.slow
def test_faster_rcnn_r50_fpn_onnx_runtime_gives_the_eager_detections(coco_images, tmp_path):
    torch.manual_seed(0)
    model = _prepare(fasterrcnn_resnet50_fpn(num_classes=91, **SMALL), coco_images)
    path = det_export.export_onnx(model, tmp_path / "faster.onnx")
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"NonMaxSuppression", "RoiAlign", "Resize"} <= ops, ops  # NMS, pooling and resizing inside the graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[1], str) and dims[2] == 3, dims  # dynamic H, W
    session = _session(path)  # one session for all 16 sizes
    _check_parity(model, coco_images, _onnx_runner(session), min_detections=200)


@pytest.mark.slow
def test_mask_rcnn_r50_fpn_onnx_runtime_gives_the_eager_detections_and_masks(coco_images, tmp_path):
    torch.manual_seed(0)
    model = _prepare(maskrcnn_resnet50_fpn(num_classes=91, **SMALL), coco_images)
    model.roi_heads.detections_per_img = 30  # masks at the image size: keep the comparison's memory small
    session = _session(seg_export.export_onnx(model, tmp_path / "mask.onnx"))
    _check_parity(model, coco_images, _onnx_runner(session), min_detections=150)


def test_c4_faster_rcnn_onnx_runtime_gives_the_eager_detections(coco_images, tmp_path):
    torch.manual_seed(0)
    model = _prepare(build_faster_rcnn(num_classes=5, backbone_name="resnet18", backbone_width=8, arch="c4",
                                       **SMALL), coco_images)
    session = _session(det_export.export_onnx(model, tmp_path / "c4.onnx"))
    _check_parity(model, coco_images, _onnx_runner(session), min_detections=200)


def test_saved_and_reloaded_torch_export_program_gives_the_eager_detections(coco_images, tmp_path):
    torch.manual_seed(0)
    model = _prepare(build_mask_rcnn(num_classes=5, backbone_name="resnet18", backbone_width=8, **SMALL),
                     coco_images)
    model.roi_heads.detections_per_img = 30
    path = seg_export.export_program(model, tmp_path / "mask.pt2")
    program = det_export.load_program(path)

    def run(image):
        with torch.no_grad():
            return [t.numpy() for t in program(torch.from_numpy(image))]

    _check_parity(model, coco_images, run, min_detections=150)


# ------------------------------------------------------------------------------------------ boundary
def test_export_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(TypeError, match=r"FasterRCNN or segmentation\.MaskRCNN"):
        det_export.export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx")
    model = build_faster_rcnn(num_classes=2, backbone_name="resnet18", backbone_width=8)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        seg_export.export(model, tmp_path / "x", "tflite")
    mask = build_mask_rcnn(num_classes=2, backbone_name="resnet18", backbone_width=8)
    with pytest.raises(ValueError, match=r"segmentation\.export"):
        det_export.export_onnx(mask, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
