"""The bad-input corpus (results files, configs, checkpoints, resume): one table, one test per row.

Every row states its class and the test holds the entry point to it:

- **fatal**: the command exits 2 with exactly one line ``PROG: error: ...`` on stderr (no traceback) that
  names the file and says what is wrong in it (the entry, the key or the tensors) and how to fix it;
- **skipped**: the bad part is left out, the run goes on, and a report says what was left out and how much;
- **accepted**: the input loads correctly (the value or the weights that arrive are checked).

The entry points are the real ones: ``resnet-det eval --results`` (results files), ``resnet-det train CONFIG
--print-config`` (configs: the same loader as training), ``resnet-det infer --checkpoint`` (checkpoints:
the loader of eval and infer), :meth:`resnet_det.engine.Checkpointer.resume` and
:func:`backbone.load_weights` (the two skipping loaders). The dataset and image rows are
tests/reliability/test_bad_datasets.py.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faults
import numpy as np
import pytest
import torch
import yaml
from engine_fakes import FakeLoader
from PIL import Image
from pycocotools import mask as mask_util
from safetensors.torch import save_file
from tiny_detection import tiny_detector

import backbone
from detection.convert import load_detector_weights
from detection.models import build_faster_rcnn
from resnet_det.cli import main
from resnet_det.config import SolverConfig, load_config
from resnet_det.engine import Checkpointer, build_lr_scheduler, build_optimizer, make_trainer_state

REPO = Path(__file__).resolve().parents[2]
SHAPES_CONFIG = REPO / "configs" / "shapes" / "faster_rcnn_R_50_FPN.yaml"
MODEL = [o for o in faults.TINY if o.startswith("model.")] + ["model.num_classes=4", "train.device=cpu"]


@dataclass(frozen=True)
class Case:
    """One row: ``make(tmp, ctx)`` writes the input and returns its path; ``expect`` are fragments of the
    error line (fatal) or of the report (skipped); ``check(tmp, ctx, path)`` checks what an accepted input
    gave."""

    kind: str
    name: str
    klass: str
    make: Callable[[Path, dict[str, Any]], Path]
    expect: tuple[str, ...] = ()
    check: Callable[[Path, dict[str, Any], Path], None] | None = None


# ------------------------------------------------------------------------------------------ results files
# Ground truth: the 16 real images of tests/data/tiny_coco (80 categories, ids 1..90).


def _det(ctx: dict[str, Any], **over: Any) -> dict[str, Any]:
    img = ctx["images"][0]
    return {"image_id": img["id"], "category_id": ctx["category"], "bbox": [10.0, 20.0, 30.0, 40.0],
            "score": 0.9, **over}


def _results(entries: Any, raw: str | None = None) -> Callable[[Path, dict[str, Any]], Path]:
    def make(tmp: Path, ctx: dict[str, Any]) -> Path:
        path = tmp / "results.json"
        data = entries(ctx) if callable(entries) else entries
        path.write_text(raw if raw is not None else json.dumps(data))
        return path

    return make


def _rle(height: int, width: int) -> dict[str, Any]:
    m = np.zeros((height, width), dtype=np.uint8, order="F")
    m[5:15, 5:25] = 1
    rle = mask_util.encode(m)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    img = ctx["images"][0]
    h, w = img["height"], img["width"]
    counts = [5 * h + 5, 10, h - 10, 10, h * w - (5 * h + 5) - 20 - (h - 10)]  # column-major runs of a small box
    return [_det(ctx, segmentation={"size": [h, w], "counts": counts})]


def _ground_truth_as_results(ctx: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in ctx["annotations"] if not a.get("iscrowd")]


def _check_perfect(tmp: Path, ctx: dict[str, Any], path: Path) -> None:
    # measured: 0 (pycocotools' eps could make it 1 - 2e-16)
    assert ctx["metrics"]["bbox"]["summary"]["AP"] == pytest.approx(1.0, abs=1e-14), ctx["metrics"]


RESULTS = [
    Case("results", "not JSON", "fatal", _results(None, raw="[{oops"), ("is not valid JSON",)),
    Case("results", "a JSON object, not a list", "fatal", _results({"image_id": 1}),
         ("holds a JSON dict", "COCO results are a JSON list")),
    Case("results", "empty list", "fatal", _results([]), ("is an empty list",)),
    Case("results", "an entry that is not an object", "fatal", _results([[1, 2, 3]]), ("entry #0 is a list",)),
    Case("results", "no score", "fatal", _results(lambda c: [{k: v for k, v in _det(c).items() if k != "score"}]),
         ("entry #0 has no 'score'",)),
    Case("results", "NaN score", "fatal", _results(lambda c: [_det(c), _det(c, score=math.nan)]),
         ("entry #1", "has score nan", "scores must be finite numbers")),
    Case("results", "score as a string", "fatal", _results(lambda c: [_det(c, score="0.9")]),
         ("has score '0.9'", "finite numbers")),
    Case("results", "image id as a string", "fatal", _results(lambda c: [_det(c, image_id=str(c["images"][0]["id"]))]),
         ("entry #0 has image_id", "ids must be integers")),
    Case("results", "unknown category", "fatal", _results(lambda c: [_det(c, category_id=999)]),
         ("category ids [999]", "not in the annotations' categories", "label_to_cat_id")),
    Case("results", "unknown image", "fatal", _results(lambda c: [_det(c, image_id=123456789)]),
         ("image ids [123456789]", "not in the annotations' images")),
    Case("results", "bbox with 3 numbers", "fatal", _results(lambda c: [_det(c, bbox=[1, 2, 3])]),
         ("has bbox [1, 2, 3]", "[x, y, width, height] with 4 finite numbers")),
    Case("results", "bbox with a negative width", "fatal", _results(lambda c: [_det(c, bbox=[50, 20, -40, 40])]),
         ("negative width or height", "width = x2 - x1")),
    Case("results", "mask of the wrong size", "fatal",
         _results(lambda c: [{k: v for k, v in _det(c, segmentation=_rle(32, 32)).items() if k != "bbox"}]),
         ("mask size [32, 32] for image", "pasted at the original image size")),
    Case("results", "segmentation as polygons", "fatal",
         _results(lambda c: [{k: v for k, v in _det(c, segmentation=[[1, 1, 5, 1, 5, 5]]).items() if k != "bbox"}]),
         ("has no RLE 'segmentation'", "encode_masks makes it")),
    Case("results", "more than 100 detections for one image and category", "skipped",
         _results(lambda c: [_det(c, score=1.0 - i / 1000) for i in range(130)]),
         ("30 of 130 detections are not counted", "maxDets=100")),
    Case("results", "valid boxes (the ground truth itself)", "accepted", _results(_ground_truth_as_results),
         check=_check_perfect),
    Case("results", "uncompressed RLE masks", "accepted", _results(_uncompressed_rle)),
]


# ------------------------------------------------------------------------------------------------ configs


def _config(text: str, base: str | None = None) -> Callable[[Path, dict[str, Any]], Path]:
    def make(tmp: Path, ctx: dict[str, Any]) -> Path:
        if base is not None:
            (tmp / "base.yaml").write_text(base)
        path = tmp / "exp.yaml"
        path.write_text(text)
        return path

    return make


def _printed(key: str, value: Any) -> Callable[[Path, dict[str, Any], Path], None]:
    def check(tmp: Path, ctx: dict[str, Any], path: Path) -> None:
        node: Any = yaml.safe_load(ctx["stdout"])
        for part in key.split("."):
            node = node[part]
        assert node == value, (key, node)

    return check


CONFIGS = [
    Case("config", "invalid YAML", "fatal", _config("solver:\n  lr: [0.1\n"), ("is not valid YAML",)),
    Case("config", "unknown key (typo)", "fatal", _config("solver:\n  lrr: 0.1\n"),
         ("unknown config key 'solver.lrr'", "did you mean 'solver.lr'",)),
    Case("config", "key in the wrong section", "fatal", _config("train:\n  lr: 0.1\n"),
         ("unknown config key 'train.lr'", "'solver.lr'")),
    Case("config", "wrong type", "fatal", _config("solver:\n  max_iter: ten\n"),
         ("config key 'solver.max_iter' got 'ten' (type str), expected int",)),
    Case("config", "float for an int", "fatal", _config("solver:\n  max_iter: 100.0\n"),
         ("'solver.max_iter'", "write 100 without the decimal point")),
    Case("config", "bool for an int", "fatal", _config("solver:\n  max_iter: true\n"),
         ("'solver.max_iter' got True (type bool), expected int",)),
    Case("config", "value out of range", "fatal", _config("solver:\n  lr: -0.1\n"),
         ("config key 'solver.lr' = -0.1 is invalid: must be > 0",)),
    Case("config", "unknown choice", "fatal", _config("train:\n  amp: fp8\n"),
         ("'train.amp' got 'fp8'", "one of 'bf16', 'fp16', 'off'")),
    Case("config", "a section given a value", "fatal", _config("solver: 3\n"),
         ("'solver' got 3", "'solver' is a section")),
    Case("config", "a list instead of a mapping", "fatal", _config("- solver\n- train\n"),
         ("must contain a mapping of sections",)),
    Case("config", "two levels of _base_", "fatal", _config("_base_: base.yaml\n", base="_base_: other.yaml\n"),
         ("only one level of _base_ is allowed",)),
    Case("config", "missing _base_ file", "fatal", _config("_base_: nowhere.yaml\n"),
         ("_base_ file 'nowhere.yaml' was not found",)),
    Case("config", "1e-4 (a string in YAML 1.1) for a float", "accepted", _config("solver:\n  weight_decay: 1e-4\n"),
         check=_printed("solver.weight_decay", 1e-4)),
    Case("config", "amp: off (a bool in YAML 1.1)", "accepted", _config("train:\n  amp: off\n"),
         check=_printed("train.amp", "off")),
    Case("config", "an empty file (all defaults)", "accepted", _config(""), check=_printed("solver.lr", 0.02)),
]


# ---------------------------------------------------------------------------------------------- checkpoints


def _weights(ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ctx["model"].state_dict().items()}


def _pth(obj: Callable[[dict[str, Any]], Any], name: str = "w.pth") -> Callable[[Path, dict[str, Any]], Path]:
    def make(tmp: Path, ctx: dict[str, Any]) -> Path:
        path = tmp / name
        torch.save(obj(ctx), path)
        return path

    return make


def _bytes(data: Callable[[dict[str, Any]], bytes], name: str) -> Callable[[Path, dict[str, Any]], Path]:
    def make(tmp: Path, ctx: dict[str, Any]) -> Path:
        path = tmp / name
        path.write_bytes(data(ctx))
        return path

    return make


def _safetensors(tmp: Path, ctx: dict[str, Any]) -> Path:
    path = tmp / "model.safetensors"
    save_file({k: v.contiguous() for k, v in _weights(ctx).items()}, str(path))
    return path


def _truncated_safetensors(tmp: Path, ctx: dict[str, Any]) -> Path:
    path = _safetensors(tmp, ctx)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _other_classes(ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    spec = load_config(SHAPES_CONFIG, MODEL).model.replace(num_classes=7)
    return build_faster_rcnn(spec).state_dict()


def _loaded_weights_equal_the_source(tmp: Path, ctx: dict[str, Any], path: Path) -> None:
    fresh = ctx["fresh_model"]()
    load_detector_weights(fresh, path)
    for k, v in ctx["model"].state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def _truncated_pth(tmp: Path, ctx: dict[str, Any]) -> Path:
    path = _pth(_weights, "t.pth")(tmp, ctx)
    path.write_bytes(path.read_bytes()[:5000])
    return path


CHECKPOINTS = [
    Case("checkpoint", "truncated .safetensors", "fatal", _truncated_safetensors,
         ("model.safetensors", "truncated or not a safetensors file")),
    Case("checkpoint", "random bytes named .safetensors", "fatal", _bytes(lambda c: b"\x00" * 64, "model.safetensors"),
         ("model.safetensors", "truncated or not a safetensors file")),
    Case("checkpoint", "empty .pth", "fatal", _bytes(lambda c: b"", "w.pth"),
         ("w.pth", "truncated, damaged or not a PyTorch file")),
    Case("checkpoint", "truncated .pth", "fatal", _truncated_pth,
         ("t.pth", "truncated, damaged or not a PyTorch file")),
    Case("checkpoint", ".pth that is not a state dict (a list)", "fatal", _pth(lambda c: [1, 2, 3]),
         ("w.pth", "does not hold a state dict of tensors: it holds a list", "save model.state_dict()")),
    Case("checkpoint", ".pth dict with non-tensor values", "fatal", _pth(lambda c: {"epoch": 3, "lr": 0.1}),
         ("w.pth", "a dict with non-tensor values (keys: epoch, lr)")),
    Case("checkpoint", "a trainer state passed as weights", "fatal",
         _pth(lambda c: {"iteration": 4, "optimizer": {}, "rng": {}}, "model_final.state.pt"),
         ("model_final.state.pt", "this is a trainer state", "pass the checkpoint's .safetensors file")),
    Case("checkpoint", "pickled objects (crafted)", "fatal", _pth(lambda c: {"x": Path("p")}, "obj.pth"),
         ("obj.pth", "holds pickled Python objects (it refers to pathlib", "nothing in it was run")),
    Case("checkpoint", "wrong shapes (another number of classes)", "fatal", _pth(_other_classes),
         ("w.pth", "mismatched shapes", "roi_heads.predictor.cls_score.weight: (8, 32) vs (5, 32)")),
    Case("checkpoint", "missing keys (a backbone-only file)", "fatal",
         _pth(lambda c: {k: v for k, v in _weights(c).items() if k.startswith("backbone.")}),
         ("w.pth", "do not fit the model: missing", "rpn.head")),
    Case("checkpoint", "unknown suffix", "fatal", _bytes(lambda c: b"x", "w.ckpt"),
         ("w.ckpt", "has suffix '.ckpt'; expected one of")),
    Case("checkpoint", "our .safetensors", "accepted", _safetensors, check=_loaded_weights_equal_the_source),
    Case("checkpoint", "a {'model': state_dict} .pth", "accepted", _pth(lambda c: {"model": _weights(c)}),
         check=_loaded_weights_equal_the_source),
    Case("checkpoint", "a DDP 'module.'-prefixed state dict", "accepted",
         _pth(lambda c: {"module." + k: v for k, v in _weights(c).items()}), check=_loaded_weights_equal_the_source),
    Case("checkpoint", "a plain state dict saved as .bin", "accepted", _pth(_weights, "pytorch_model.bin"),
         check=_loaded_weights_equal_the_source),
]


# ------------------------------------------------------------------------------- the skipping loaders


def _classifier_file(tmp: Path, ctx: dict[str, Any]) -> Path:
    """torchvision's ResNet-18 ImageNet classifier (random weights): its fc layer has no place in a trunk."""
    import torchvision

    path = tmp / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def _damaged_latest(tmp: Path, ctx: dict[str, Any]) -> Path:
    run = tmp / "run"
    model = tiny_detector(seed=0)  # the real tiny Faster R-CNN; the loader (only its position is saved) stands in
    cfg = SolverConfig(lr=0.1, max_iter=10, steps=(5,), warmup_iters=1)
    opt = build_optimizer(model, cfg)
    ck = Checkpointer(run)
    for it in (1, 2):
        ck.save(f"model_{it:07d}", model, make_trainer_state(it, opt, build_lr_scheduler(opt, cfg), None, FakeLoader()))
    weights = run / "model_0000002.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return weights


SKIPPING = [
    Case("weights", "a classifier file into a bare backbone (head keys)", "skipped", _classifier_file,
         ("2 ignored: fc.weight, fc.bias",)),
    Case("resume", "a truncated latest checkpoint", "skipped", _damaged_latest,
         ("model_0000002.safetensors cannot be read", "Resuming from 'model_0000001' (iteration 1)")),
]

TABLE = RESULTS + CONFIGS + CHECKPOINTS + SKIPPING


# ------------------------------------------------------------------------------------------------ runner


@pytest.fixture(scope="module")
def corpus(tiny_coco_src: Path) -> dict[str, Any]:
    """What the rows need: the tiny COCO ground truth and a tiny detector (the weights the files carry)."""
    gt = json.loads((tiny_coco_src / "annotations.json").read_text())
    used = {a["category_id"] for a in gt["annotations"] if a["image_id"] == gt["images"][0]["id"]}

    def fresh_model() -> torch.nn.Module:
        return build_faster_rcnn(load_config(SHAPES_CONFIG, MODEL).model)

    torch.manual_seed(0)
    return {"annotations_file": tiny_coco_src / "annotations.json", "images": gt["images"],
            "annotations": gt["annotations"], "category": min(used), "model": fresh_model(),
            "fresh_model": fresh_model}


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err, [str(w.message) for w in caught]


def _fatal_line(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


def _image(tmp: Path) -> Path:
    path = tmp / "000000000001.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("case", TABLE, ids=[f"{c.kind}: {c.name} [{c.klass}]" for c in TABLE])
def test_bad_input(case: Case, corpus: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture,
                   caplog: pytest.LogCaptureFixture) -> None:
    ctx = dict(corpus)  # what this case adds (metrics, stdout) stays in this case
    path = case.make(tmp_path, ctx)
    if case.kind == "results":
        argv = ["eval", "--results", str(path), "--annotations", str(ctx["annotations_file"]), "--output-dir",
                str(tmp_path / "out")]
        prog = "resnet-det eval"
    elif case.kind == "config":
        argv = ["train", str(path), "--print-config"]
        prog = "resnet-det train"
    elif case.kind == "checkpoint":
        argv = ["infer", str(SHAPES_CONFIG), *MODEL, "--checkpoint", str(path), "--input", str(_image(tmp_path)),
                "--output", str(tmp_path / "pred"), "--no-progress"]
        prog = "resnet-det infer"
    elif case.kind == "weights":
        report = backbone.load_weights(backbone.build_backbone("resnet18"), path)
        assert report.ok and case.klass == "skipped"
        assert all(fragment in str(report) for fragment in case.expect), str(report)
        return
    else:
        ck = Checkpointer(path.parent)
        model = tiny_detector(seed=1)
        opt = build_optimizer(model, SolverConfig(lr=0.1, max_iter=10, steps=(5,), warmup_iters=1))
        with caplog.at_level("WARNING", logger="resnet_det.engine.checkpoint"):
            assert ck.resume(model, opt, None, None, FakeLoader()) == 1, "resumed from the previous checkpoint"
        assert all(fragment in caplog.text for fragment in case.expect), caplog.text
        return

    code, out, err, warned = _run(argv, capsys)
    if case.klass == "fatal":
        line = _fatal_line(err, prog)
        assert code == 2, line
        assert path.name in line, f"the message names the file: {line}"
        for fragment in case.expect:
            assert fragment in line, f"{fragment!r} not in {line!r}"
        return
    assert code == 0, err[-3000:]
    if case.klass == "skipped":
        report = " ".join(warned) + err
        for fragment in case.expect:
            assert fragment in report, f"{fragment!r} not in the report {report[-2000:]!r}"
    if case.kind == "results":
        ctx["metrics"] = json.loads((tmp_path / "out" / "metrics.json").read_text())
        assert "Average Precision" in out + err
    if case.kind == "config":
        ctx["stdout"] = out
    if case.kind == "checkpoint":
        assert (tmp_path / "pred" / "results.json").is_file()
    if case.check is not None:
        case.check(tmp_path, ctx, path)


def test_the_table_covers_every_class_and_enough_cases() -> None:
    classes = {c.klass for c in TABLE}
    assert classes == {"fatal", "skipped", "accepted"} and len(TABLE) >= 25
    assert len({(c.kind, c.name) for c in TABLE}) == len(TABLE), "each row is one case"
