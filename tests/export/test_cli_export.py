"""`resnet-det export` and `resnet-det infer --onnx`: the command line from a checkpoint to the ONNX file, and
inference with ONNX Runtime, numpy and Pillow only (no torch, no model code in `sys.modules`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from detection.models import build_faster_rcnn
from resnet_det.cli import main
from resnet_det.cli.infer_onnx import rle_encode
from resnet_det.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs/shapes/faster_rcnn_R_50_FPN.yaml")
TINY = ["model.backbone.name=resnet18", "model.backbone.width=8", "model.backbone.norm=GN", "model.fpn.channels=16",
        "model.roi.fc_dim=32", "model.input.test_min_size=96", "model.input.test_max_size=128", "model.num_classes=3"]
FORBIDDEN = ("torch", "torchvision", "backbone", "detection", "segmentation")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_faster_rcnn(load_config(CONFIG, TINY).model)
    with torch.no_grad():  # a background-free classifier bias, so detections exist above the threshold
        model.roi_heads.predictor.cls_score.bias.copy_(torch.tensor([-5.0, 3.0, 0.0, 0.0]))
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_export_then_infer_onnx_without_torch(checkpoint: Path, tmp_path: Path) -> None:
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", CONFIG, *TINY, "--checkpoint", str(checkpoint), "--output", str(onnx_file)]) == 0
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000000000139.jpg", "000000391895.jpg"):  # two tiny-COCO-named images of different sizes
        (images / name).write_bytes((REPO / "tests/data/tiny_coco/images/000000391895.jpg").read_bytes()
                                    if name.endswith("895.jpg") else
                                    (REPO / "tests/data/tiny_coco/images/000000005802.jpg").read_bytes())
    out = tmp_path / "out"
    code = ("import json, sys; from resnet_det.cli import main; "
            f"rc = main(['infer', '--onnx', {str(onnx_file)!r}, '--input', {str(images)!r}, '--output', {str(out)!r}, "
            "'--score-thresh', '0.0']); print(json.dumps({'rc': rc, 'modules': sorted(sys.modules)}))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    loaded = [m for m in report["modules"] if m.split(".")[0] in FORBIDDEN]
    assert not loaded, f"infer --onnx loaded {loaded[:10]}"
    assert "onnxruntime" in report["modules"]
    results = json.loads((out / "results.json").read_text())
    assert {r["image_id"] for r in results} == {139, 391895}
    assert all(len(r["bbox"]) == 4 and r["category_id"] in (1, 2, 3) for r in results)
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["000000000139.jpg", "000000391895.jpg"]


def test_export_torch_export_format_writes_a_loadable_program(checkpoint: Path, tmp_path: Path) -> None:
    from detection.export import load_program

    path = tmp_path / "model.pt2"
    assert main(["export", CONFIG, *TINY, "--checkpoint", str(checkpoint), "--format", "torch-export",
                 "--output", str(path)]) == 0
    image = np.asarray(Image.open(REPO / "tests/data/tiny_coco/images/000000005802.jpg").convert("RGB")).copy()
    boxes, scores, labels = load_program(path)(torch.from_numpy(image))
    assert boxes.shape == (len(scores), 4) and labels.dtype == torch.int64 and len(scores) > 0


def test_export_bad_input_is_one_clear_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "m.onnx")
    assert main(["export", CONFIG, *TINY, "--checkpoint", str(tmp_path / "nope.safetensors"), "--output", out]) == 2
    line = _error(capsys)
    assert "--checkpoint" in line and "does not exist" in line
    with pytest.raises(SystemExit) as e:
        main(["export", CONFIG, "--checkpoint", str(checkpoint), "--format", "tflite", "--output", out])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    semantic = str(REPO / "configs/shapes/semantic_R_50_FPN.yaml")
    assert main(["export", semantic, "--checkpoint", str(checkpoint), "--output", out]) == 2
    assert "export covers detectors" in _error(capsys)
    assert main(["export", CONFIG, *TINY, "--checkpoint", str(checkpoint), "--output", str(tmp_path)]) == 2
    assert "is a folder" in _error(capsys)
    assert not Path(out).exists()


def test_infer_onnx_bad_input_is_one_clear_line(tmp_path: Path, capsys) -> None:
    assert main(["infer", "--onnx", str(tmp_path / "no.onnx"), "--input", str(tmp_path), "--output",
                 str(tmp_path / "o")]) == 2
    assert _error(capsys)
    (tmp_path / "img.png").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        main(["infer", "--onnx", "m.onnx", "--checkpoint", "w", "--input", str(tmp_path), "--output", "o"])
    assert e.value.code == 2 and "drop --checkpoint" in capsys.readouterr().err


def test_rle_encoding_equals_pycocotools() -> None:
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for shape in [(5, 7), (31, 17), (64, 48)]:
        for density in (0.0, 0.3, 0.97, 1.0):
            m = rng.random(shape) < density
            if m.size:
                m[0, 0] = density > 0.5  # masks starting with a foreground pixel too
            ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            assert rle_encode(m) == {"size": list(ref["size"]), "counts": ref["counts"].decode()}, (shape, density)


_LIMITED_EXPORT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
from resnet_det.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("fmt", "name", "what"), [("onnx", "m.onnx", "ONNX file"),
                                                   ("torch-export", "m.pt2", "torch.export program")])
def test_export_whose_file_cannot_be_written_is_exit_3_naming_it(checkpoint: Path, tmp_path: Path, fmt: str,
                                                                  name: str, what: str) -> None:
    """A write that fails part way (here files are capped at 64 KiB, RLIMIT_FSIZE: EFBIG, as a full disk gives
    ENOSPC; tests/reliability/test_real_full_disk.py fills a real tmpfs where mounting is allowed): one line
    naming the file, exit 3, and neither a half file nor a temporary file left in the folder."""
    out = tmp_path / "out"
    out.mkdir()
    argv = ["export", CONFIG, *TINY, "--checkpoint", str(checkpoint), "--format", fmt, "--output", str(out / name)]
    proc = subprocess.run([sys.executable, "-c", _LIMITED_EXPORT, *argv], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-3000:]
    assert f"resnet-det export: error: could not write {what} {out / name}: EFBIG" in errors[0], errors[0]
    assert list(out.iterdir()) == []
