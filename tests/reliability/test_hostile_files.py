"""Hostile files: a pickle whose ``__reduce__`` would CREATE A FILE, handed to every loader of the project.

The file never appears (nothing of the pickle runs: every ``torch.load`` passes ``weights_only=True``), and
each entry point fails with one line that names the file and says why: library calls raise the project's
error, the commands exit 2 with ``PROG: error: ...`` and no traceback. A last test reads every ``torch.load``
call of the project's code (ast) and fails unless it passes ``weights_only=True``; it also refuses the
other ways to unpickle (``pickle.load(s)``, ``yaml.load``, ``np.load(allow_pickle=True)``, ``torch.hub.load``).
"""

from __future__ import annotations

import ast
import builtins
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import faults
import numpy as np
import pytest
import torch
from PIL import Image

import backbone
import detection
from backbone.weights import WeightsError
from detection.convert import load_detector_weights
from detection.models import build_faster_rcnn
from resnet_det.cli import main
from resnet_det.config import load_config
from resnet_det.engine import Checkpointer, CheckpointError

REPO = Path(__file__).resolve().parents[2]
PROJECT = ("resnet_det_common", "backbone", "detection", "segmentation", "resnet_det", "tools")
TORCHVISION_COCO = "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"  # torchvision's file name for COCO_V1


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Open:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


class _Exec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _craft(path: Path, marker: Path, *, payload: type = _System, raw: bool = False) -> Path:
    """A weights-looking file (a real tensor beside the payload): torch's zip format, or a raw pickle."""
    obj = {"conv1.weight": torch.zeros(2), "extra": payload(marker)}
    if raw:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path)
    return path


def _unsafe_load_runs_it(path: Path, marker: Path) -> None:
    """Control: loading the same file *without* weights_only does run the payload (the test can fail)."""
    torch.load(path, weights_only=False)
    assert marker.exists(), "the crafted pickle must be able to create the file"
    marker.unlink()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


@pytest.mark.parametrize("payload", [_System, _Open, _Exec])
@pytest.mark.parametrize("raw", [False, True], ids=["torch zip", "raw pickle"])
def test_every_payload_and_format_is_refused_by_read_state_dict(tmp_path, marker, payload, raw):
    evil = _craft(tmp_path / "evil.pth", marker, payload=payload, raw=raw)
    if not raw:
        _unsafe_load_runs_it(evil, marker)
    with pytest.raises(WeightsError) as err:
        backbone.read_state_dict(evil)
    assert not marker.exists()
    msg = str(err.value)
    assert f"could not read weights file {str(evil)!r}: it holds pickled Python objects" in msg, msg
    assert "nothing in it was run" in msg and "\n" not in msg


def _tiny_detector():
    cfg = load_config(REPO / "configs/shapes/faster_rcnn_R_50_FPN.yaml", faults.TINY)
    return build_faster_rcnn(cfg.model.replace(num_classes=4))


LIBRARY_LOADERS: dict[str, Callable[[Path], object]] = {
    "backbone.load_weights": lambda p: backbone.load_weights(backbone.build_backbone("resnet18", width=8), p),
    "backbone.resnet18(weights=)": lambda p: backbone.resnet18(weights=str(p)),
    "detection.convert.load_detector_weights": lambda p: load_detector_weights(_tiny_detector(), p),
    "detection.fasterrcnn_resnet50_fpn(weights=)": lambda p: detection.fasterrcnn_resnet50_fpn(weights=str(p)),
}


@pytest.mark.parametrize("loader", list(LIBRARY_LOADERS))
def test_library_loaders_refuse_the_payload_with_one_line_naming_the_file(tmp_path, marker, loader):
    evil = _craft(tmp_path / "evil.pth", marker)
    with pytest.raises(WeightsError) as err:
        LIBRARY_LOADERS[loader](evil)
    assert not marker.exists()
    msg = str(err.value)
    assert str(evil) in msg and "pickled Python objects" in msg and "posix.system" in msg and "\n" not in msg


def test_the_trainer_state_loader_refuses_the_payload(tmp_path, marker):
    ck = Checkpointer(tmp_path / "run")
    ck.save("model_0000001", torch.nn.Linear(2, 2), {"iteration": 1})
    _craft(tmp_path / "run" / "model_0000001.state.pt", marker)
    with pytest.raises(CheckpointError, match=r"model_0000001\.state\.pt cannot be loaded: it holds pickled") as err:
        ck.load("model_0000001")
    assert not err.value.damaged and not marker.exists()


def test_torchvision_and_timm_routes_never_unpickle_the_payload(tmp_path, marker, monkeypatch):
    import timm

    # torchvision's weight name resolves to this file in torch's hub cache: its hash prefix is checked first.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / TORCHVISION_COCO
    cached.parent.mkdir(parents=True)
    _craft(cached, marker)
    with pytest.raises(WeightsError, match=rf"{TORCHVISION_COCO} is damaged or not the published file") as err:
        detection.fasterrcnn_resnet50_fpn(weights="COCO_V1")
    assert str(cached) in str(err.value) and not marker.exists()
    # timm's own route (pretrained_cfg_overlay=dict(file=...)): our entrypoints read the file with the
    # project's weights-only reader, so the error names it.
    evil = _craft(tmp_path / "evil.pth", marker)
    with pytest.raises(WeightsError, match=r"evil\.pth.*pickled"):
        timm.create_model("resnetdet_resnet18", pretrained=True, pretrained_cfg_overlay={"file": str(evil)})
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- commands


@pytest.fixture
def cli(shapes_env, monkeypatch, capsys):
    """``resnet-det ARGS`` in this process: (exit code, stderr lines)."""
    monkeypatch.setenv("RESNET_DET_CACHE", shapes_env["RESNET_DET_CACHE"])

    def run(*argv: str) -> tuple[int, list[str]]:
        code = main(list(argv))
        err = capsys.readouterr().err
        return code, [line for line in err.splitlines() if line.strip()]

    return run


def _one_error_line(lines: list[str], prog: str) -> str:
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    return errors[0]


def test_eval_and_infer_checkpoint_refuse_the_payload_exit_2(tmp_path, marker, cli):
    evil = _craft(tmp_path / "evil.pth", marker)
    image = tmp_path / "img.jpg"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(image)
    tiny = [*faults.TINY, f"train.output_dir={tmp_path / 'out'}"]
    code, lines = cli("eval", faults.CONFIG, "--checkpoint", str(evil), *tiny, "--no-progress")
    line = _one_error_line(lines, "resnet-det eval")
    assert code == 2 and str(evil) in line and "pickled Python objects" in line, line
    code, lines = cli("infer", faults.CONFIG, "--checkpoint", str(evil), "--input", str(image), "--output",
                      str(tmp_path / "pred"), "model.num_classes=4", *tiny)
    line = _one_error_line(lines, "resnet-det infer")
    assert code == 2 and str(evil) in line and "pickled Python objects" in line, line
    assert not marker.exists()


@pytest.mark.parametrize("key", ["model.weights", "model.backbone.weights"])
def test_train_with_crafted_weights_in_the_config_exits_2(tmp_path, marker, cli, key):
    evil = _craft(tmp_path / "evil.pth", marker)
    code, lines = cli(*faults.train_argv(tmp_path / "run", f"{key}={evil}"))
    line = _one_error_line(lines, "resnet-det train")
    assert code == 2 and str(evil) in line and "pickled Python objects" in line, line
    assert not marker.exists()


def test_train_resume_with_a_crafted_trainer_state_exits_2_and_never_falls_back(tmp_path, marker, cli, copy_of,
                                                                                reference_run):
    run = copy_of(reference_run)
    state = run / "model_final.state.pt"
    _craft(state, marker)
    code, lines = cli(*faults.train_argv(run, "--resume"))
    line = _one_error_line(lines, "resnet-det train")
    assert code == 2 and str(state) in line and "pickled Python objects" in line, line
    assert not marker.exists()
    assert not any("Resuming from" in x for x in lines), "a crafted file stops the resume: no silent fallback"


# ------------------------------------------------------------------------------------- the code itself


def unsafe_loads(source: str, where: str = "<snippet>", seen: list[str] | None = None) -> list[str]:
    """Every call in ``source`` that could unpickle an arbitrary object, as ``where:line: call``; every
    ``torch.load`` call (safe or not) is also appended to ``seen``."""
    found = []
    torch_load_names = {"torch.load", "torch.serialization.load"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            torch_load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
        if isinstance(node, ast.ImportFrom) and node.module == "pickle":
            found.append(f"{where}:{node.lineno}: from pickle import ...")
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {kw.arg: kw.value for kw in node.keywords}
        flag = None
        if name in torch_load_names:
            if seen is not None:
                seen.append(f"{where}:{node.lineno}")
            wo = kwargs.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                flag = "torch.load without weights_only=True"
        elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "torch.hub.load",
                      "joblib.load"):
            flag = name
        elif name == "yaml.load" and "Safe" not in ast.unparse(kwargs.get("Loader", ast.Constant(None))):
            flag = "yaml.load without a SafeLoader"
        elif name in ("np.load", "numpy.load"):
            ap = kwargs.get("allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                flag = "np.load with allow_pickle"
        if flag:
            found.append(f"{where}:{node.lineno}: {flag}")
    return found


def test_the_checker_finds_unsafe_loads():
    snippet = """
import torch, pickle, yaml, numpy as np
from torch import load as tl
torch.load(p)
torch.load(p, weights_only=False)
tl(p)
pickle.loads(b)
yaml.load(text, Loader=yaml.Loader)
np.load(p, allow_pickle=True)
torch.load(p, map_location="cpu", weights_only=True)
yaml.load(text, Loader=yaml.SafeLoader)
np.load(p)
"""
    assert [f.split(": ", 1)[1] for f in unsafe_loads(snippet)] == [
        "torch.load without weights_only=True", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "pickle.loads", "yaml.load without a SafeLoader",
        "np.load with allow_pickle",
    ]


def test_every_torch_load_of_the_project_passes_weights_only_true():
    files = [p for package in PROJECT for p in sorted((REPO / package).rglob("*.py"))]
    calls: list[str] = []
    found = []
    for path in files:
        found += unsafe_loads(path.read_text(encoding="utf-8"), path.relative_to(REPO).as_posix(), calls)
    # The scan sees the project's loads (the one helper of resnet_det_common.io, the CIFAR study's resume).
    assert any(c.startswith("resnet_det_common/io.py:") for c in calls), calls
    assert not found, f"loads that could unpickle arbitrary objects: {found}"
