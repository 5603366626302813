"""The CIFAR-10 degradation study (resnet_det.studies.degradation): data reading, augmentation, schedule,
resume, reports (tiny, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import resnet_det.studies.degradation as cifar
from resnet_det.studies.degradation import (
    StudyConfig,
    augment,
    load_cifar10,
    lr_at,
    run_degradation_study,
    synthetic_cifar,
    train_one,
)


def _write_bin(path: Path, labels: list[int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    rec = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], pixels], axis=1)
    path.write_bytes(rec.tobytes())
    return pixels


def test_load_cifar10_binary_format_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    train_pixels = [_write_bin(folder / f"data_batch_{i}.bin", [i, 9], seed=i) for i in range(1, 6)]
    test_pixels = _write_bin(folder / "test_batch.bin", [0, 3, 7], seed=10)
    data = load_cifar10(tmp_path)
    x, y = data["train"]
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [1, 9, 2, 9, 3, 9, 4, 9, 5, 9]
    # record layout: 1024 red bytes (row-major), then green, then blue
    assert x[0, 0, 0, 1] == train_pixels[0][0, 1] and x[0, 1, 0, 0] == train_pixels[0][0, 1024]
    assert x[3, 2, 31, 31] == train_pixels[1][1, 3071]
    assert data["test"][1].tolist() == [0, 3, 7] and torch.equal(
        data["test"][0].reshape(3, -1), torch.from_numpy(test_pixels))


def test_load_cifar10_truncated_file_names_it(tmp_path: Path) -> None:
    for i in range(1, 6):
        _write_bin(tmp_path / f"data_batch_{i}.bin", [1], seed=i)
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(ValueError, match=r"test_batch\.bin.*3073"):
        load_cifar10(tmp_path)


def test_load_cifar10_missing_batches_and_missing_folder(tmp_path: Path) -> None:
    _write_bin(tmp_path / "test_batch.bin", [1], seed=0)
    with pytest.raises(FileNotFoundError, match=r"data_batch_1\.bin"):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 under"):
        load_cifar10(tmp_path / "nowhere")


def test_augment_is_a_padded_crop_with_optional_flip() -> None:
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    g = torch.Generator().manual_seed(3)
    out = augment(x, g)
    g = torch.Generator().manual_seed(3)  # replay the same draws
    oy, ox = torch.randint(0, 9, (2,), generator=g), torch.randint(0, 9, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(2):
        crop = padded[i, :, oy[i]:oy[i] + 32, ox[i]:ox[i] + 32]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop)


def test_augment_mirrors_some_images_and_not_others() -> None:
    # Columns numbered 1..32: an unmirrored crop increases left to right, a mirrored one decreases.
    x = torch.arange(1, 33, dtype=torch.float32).expand(64, 3, 32, 32).clone()
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    row = out[:, 0, 16, 12:20]  # columns every crop offset keeps inside the image
    rising, falling = (row.diff(dim=1) > 0).all(1), (row.diff(dim=1) < 0).all(1)
    assert bool((rising | falling).all()) and 0 < int(falling.sum()) < 64


def test_schedule_milestones_and_warmup_for_110_layers() -> None:
    cfg = StudyConfig(iterations=64_000)
    # measured: 1.7e-18 on the list, 0 on the next line (rel 1e-12 for float rounding)
    assert [lr_at(cfg, 56, it) for it in (0, 31_999, 32_000, 47_999, 48_000)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001], rel=1e-12)
    assert lr_at(cfg, 110, 0) == pytest.approx(0.01, rel=1e-12)
    assert lr_at(cfg, 110, 400) == pytest.approx(0.1, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"depths": (21,)}, "depths: 21"),
    ({"kinds": ("wide",)}, "kinds"),
    ({"amp": "fp8"}, "amp='fp8'"),
    ({"iterations": 0}, "iterations must be > 0"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StudyConfig(**kwargs)


def test_synthetic_data_is_deterministic_and_balanced() -> None:
    a, b = synthetic_cifar(200, 50, seed=1), synthetic_cifar(200, 50, seed=1)
    assert torch.equal(a["train"][0], b["train"][0]) and torch.equal(a["test"][1], b["test"][1])
    assert a["train"][0].shape == (200, 3, 32, 32) and set(a["train"][1].tolist()) == set(range(10))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_cfg(**kw) -> StudyConfig:
    base = dict(depths=(8,), kinds=("plain", "resnet"), iterations=4, batch_size=8, eval_period=1,
                checkpoint_period=2)
    base.update(kw)
    return StudyConfig(**base)


def test_resume_after_a_crash_continues_identically(one_thread: None, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = synthetic_cifar(64, 16, seed=0)
    cfg = _tiny_cfg()
    straight = train_one("resnet", 8, data, cfg, tmp_path / "straight", torch.device("cpu"), progress=False)
    real_lr_at = cifar.lr_at

    def crash_at_3(c: StudyConfig, depth: int, it: int) -> float:
        if it == 3:
            raise KeyboardInterrupt
        return real_lr_at(c, depth, it)

    monkeypatch.setattr(cifar, "lr_at", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_one("resnet", 8, data, cfg, tmp_path / "resumed", torch.device("cpu"), progress=False)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file() and not (tmp_path / "resumed" / "result.json").exists()
    monkeypatch.setattr(cifar, "lr_at", real_lr_at)
    resumed = train_one("resnet", 8, data, cfg, tmp_path / "resumed", torch.device("cpu"), progress=False)
    a = cifar.read_curve(tmp_path / "straight" / "metrics.jsonl")
    b = cifar.read_curve(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["iteration"] for r in b] == [1, 2, 3, 4]
    # measured: 0 on every loss and on the final error: the resumed run is bit for bit the straight one
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert resumed["final_test_error"] == straight["final_test_error"]
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()


def test_study_end_to_end_writes_reports_and_skips_finished_nets(one_thread: None, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(cifar, "synthetic_cifar", lambda seed=0: synthetic_cifar(48, 16, seed=seed))
    summary = run_degradation_study("synthetic", _tiny_cfg(depths=(8, 14)), tmp_path, device="cpu", progress=False)
    assert {r["name"] for r in summary["rows"]} == {"plain8", "plain14", "resnet8", "resnet14"}
    assert "plain_deeper_minus_shallower_train_error" in summary
    assert all(r["paper_test_error"] is None for r in summary["rows"])  # the paper's figures are CIFAR-10's
    for f in ("study.md", "study.json", "study.png", "config.json"):
        assert (tmp_path / f).stat().st_size > 0
    assert "| resnet14 |" in capsys.readouterr().out
    # a second run trains nothing: every net has its result.json
    monkeypatch.setattr(cifar, "train_one", lambda *a, **k: pytest.fail("retrained a finished net"))
    again = run_degradation_study("synthetic", _tiny_cfg(depths=(8, 14)), tmp_path, device="cpu", progress=False)
    assert json.loads((tmp_path / "study.json").read_text()) == again


def test_batch_larger_than_the_dataset_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar, "synthetic_cifar", lambda seed=0: synthetic_cifar(16, 8, seed=seed))
    with pytest.raises(ValueError, match="batch_size=32 is larger than the 16 training images"):
        run_degradation_study("synthetic", _tiny_cfg(batch_size=32), tmp_path, device="cpu", progress=False)


def test_paper_row_is_attached_to_resnet20() -> None:
    rows = cifar.summarize([{"name": "resnet20", "kind": "resnet", "depth": 20, "params": 1,
                             "final_train_error": 1.0, "final_test_error": 8.0}])["rows"]
    assert rows[0]["paper_test_error"] == 8.75


def test_cli_reports_bad_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("degradation_study", Path(__file__).parents[2] / "tools" /
                                                  "degradation_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "no CIFAR-10 under" in capsys.readouterr().err
