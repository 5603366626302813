"""The package as a user installs it: a wheel built from this checkout, installed into an empty folder,
run from another empty folder with the repository off sys.path: the configs ship and are found by name
(`_base_` included), `python -m resnet_det` and the `resnet-det` script work, and a tiny train, eval
of its checkpoint and infer on an image all exit 0 and write their files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from resnet_det import __version__

REPO = Path(__file__).resolve().parents[2]
CODE = ("resnet_det_common", "backbone", "detection", "segmentation", "resnet_det")
# data / solver / train overrides only: they keep the run tiny whatever the model section looks like.
TINY = ["data.shapes_num_train=8", "data.shapes_num_val=4", "data.shapes_image_size=64", "data.num_workers=0",
        "solver.ims_per_batch=2", "solver.max_iter=2", "solver.steps=[100]", "solver.warmup_iters=1",
        "train.device=cpu", "train.checkpoint_period=2", "train.log_period=1", "train.max_time_minutes=null"]


def _source_copy(dst: Path) -> Path:
    """What a build reads (top-level files, the packages, configs/), without build/ or caches of the checkout,
    so stale files there cannot reach the wheel and concurrent builds do not collide."""
    dst.mkdir()
    for item in REPO.iterdir():
        if item.is_file():
            shutil.copy2(item, dst / item.name)
    for name in (*CODE, "configs"):
        shutil.copytree(REPO / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def _run(args: list[str], *, cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    tail = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{tail}"
    return done


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path: Path) -> None:
    start = time.perf_counter()
    # pip builds and installs from local files only: no index, no version check over the network.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(_source_copy(tmp_path / "src")), "--no-deps",
          "--no-build-isolation", "--no-cache-dir", "-q", "-w", str(dist)], cwd=tmp_path, env=env)
    (wheel,) = dist.glob("resnet_det-*.whl")
    assert wheel.name.startswith(f"resnet_det-{__version__}-"), "the version comes from resnet_det.__version__"

    # What the wheel holds: every module of the packages, every config, and the console script.
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = z.read(entry_points).decode()
    modules = {p.relative_to(REPO).as_posix() for name in CODE for p in (REPO / name).rglob("*.py")}
    assert modules <= names, f"modules missing from the wheel: {sorted(modules - names)}"
    configs = {f"resnet_det/{p.relative_to(REPO).as_posix()}" for p in (REPO / "configs").rglob("*.y*ml")}
    assert configs and configs <= names, f"configs missing from the wheel: {sorted(configs - names)}"
    assert "resnet-det = resnet_det.cli:main" in scripts and "[console_scripts]" in scripts

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "-q", "--target", str(site),
          str(wheel)], cwd=tmp_path, env=env)
    empty = tmp_path / "empty"
    empty.mkdir()
    # -P and PYTHONSAFEPATH (Python >= 3.11): neither the working folder nor a script's folder joins sys.path
    # (on 3.10 the working folder is empty anyway); the venv's editable install stays behind PYTHONPATH (its
    # finder comes after the path finder), and the first command below checks where the imports come from.
    env.update(PYTHONPATH=str(site), PYTHONSAFEPATH="1", RESNET_DET_CACHE=str(tmp_path / "cache"))
    python = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else [])]

    where = _run([*python, "-c", "import json, backbone, detection, segmentation, resnet_det, resnet_det.config_files "
                  "as c; print(json.dumps([m.__file__ for m in (backbone, detection, segmentation, resnet_det)] "
                  "+ [str(c.configs_root())]))"], cwd=empty, env=env)
    files = json.loads(where.stdout)
    assert all(Path(f).resolve().is_relative_to(site.resolve()) for f in files), files

    listed = _run([*python, "-m", "resnet_det", "configs"], cwd=empty, env=env).stdout
    names_listed = {line.split()[0] for line in listed.splitlines()}
    assert names_listed == {c.removeprefix("resnet_det/configs/").rsplit(".", 1)[0] for c in configs}
    script = _run([str(site / "bin" / "resnet-det"), "configs", "paper"], cwd=empty, env=env).stdout
    assert "paper/faster_rcnn_R_101_C4" in script

    printed = _run([*python, "-m", "resnet_det", "train", "coco/mask_rcnn_R_101_FPN_1x", "--print-config"],
                   cwd=empty, env=env).stdout
    base = yaml.safe_load((REPO / "configs/coco/faster_rcnn_R_50_FPN_1x.yaml").read_text())
    assert yaml.safe_load(printed)["solver"]["max_iter"] == base["solver"]["max_iter"]  # through _base_

    run = tmp_path / "run"
    trained = _run([*python, "-m", "resnet_det", "train", "shapes/faster_rcnn_R_50_FPN", "--no-progress", *TINY,
                    f"train.output_dir={run}"], cwd=empty, env=env)
    assert "final: bbox/AP" in trained.stdout
    assert (run / "config.yaml").is_file() and (run / "model_final.safetensors").is_file()

    evaluated = _run([*python, "-m", "resnet_det", "eval", str(run / "config.yaml"), "--checkpoint",
                      str(run / "model_final.safetensors"), "--no-progress"], cwd=empty, env=env)
    table_line = "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"
    assert table_line in evaluated.stdout + evaluated.stderr  # the COCO table, printed or logged
    assert any((run / "eval").iterdir())

    image = empty / "image.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    _run([*python, "-m", "resnet_det", "infer", str(run / "config.yaml"), "--checkpoint",
          str(run / "model_final.safetensors"), "--input", str(image), "--output", str(out), "--no-progress"],
         cwd=empty, env=env)
    assert isinstance(json.loads((out / "results.json").read_text()), list)
    assert (out / "vis" / "image.jpg").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["image.jpg"], "nothing written into the working folder"
    print(f"wheel test: {time.perf_counter() - start:.1f} s")
