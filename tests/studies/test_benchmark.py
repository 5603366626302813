"""The harness of `resnet-det benchmark` (resnet_det.studies.benchmark) on CPU: the same weights and load for
both models, interleaved repeats, like-for-like and labelled best-vs-best ratios, memory measured in a process
per model, and a record that says how every figure was taken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import resnet_det.studies.benchmark as bm

TINY = dict(archs=("R18-FPN",), device="cpu", height=64, width=96, train_batch=2, infer_batches=(1, 2), iters=2,
            warmup=1, repeats=2, model_size=(64, 96), memory="off")


def test_calls_alternate_and_the_first_model_rotates_between_repeats() -> None:
    log: list[str] = []
    calls = {n: (lambda n=n: log.append(n)) for n in "abc"}
    out = bm.interleaved_repeats(calls, device=torch.device("cpu"), iters=2, repeats=3)
    assert log == list("abcabc" "bcabca" "cabcab")
    assert set(out) == set("abc") and all(len(v) == 3 and min(v) >= 0 for v in out.values())


@pytest.mark.usefixtures("single_thread")
def test_both_models_get_the_same_weights_and_post_processing_load() -> None:
    ours, tv = bm.build_pair("R18-FPN", model_size=(64, 96), calibration=(64, 96))
    images, _ = bm.make_inputs(2, 64, 96, torch.device("cpu"), seed=3)
    with torch.inference_mode():
        a, b = ours.eval()(images), tv.eval()(images)
    for x, y in zip(a, b):
        assert len(x["boxes"]) == len(y["boxes"]) >= 50, "a trained detector's load, the same for both"
        # measured: 0 on both images (the same weights, the same box arithmetic); atol 1e-4 px for float32 kernels
        assert torch.allclose(x["boxes"], y["boxes"], rtol=0, atol=1e-4) and torch.equal(x["labels"], y["labels"])
        assert len(set(x["labels"].tolist())) > 3, "varied classes, not one class everywhere"
    again, _ = bm.build_pair("R18-FPN", model_size=(64, 96), calibration=(64, 96))
    assert all(torch.equal(p, q) for p, q in zip(ours.state_dict().values(), again.state_dict().values()))


@pytest.mark.usefixtures("single_thread")
def test_run_measures_every_variant_and_records_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1073741824")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr("sys.argv", ["resnet-det", "benchmark", "--device", "cpu"])
    cfg = bm.BenchConfig(**TINY, models=("ours", "ours-prepared", "ours-static", "torchvision", "torchvision-cl"))
    lines: list[str] = []
    rows = bm.run(cfg, log=lines.append)
    got = {(r.model, r.mode, r.batch) for r in rows}
    assert got == {(m, "train", 2) for m in ("ours", "torchvision", "torchvision-cl")} | {
        (m, "infer", b) for m in cfg.models for b in (1, 2)}
    assert len(lines) == len(rows)
    for r in rows:
        assert len(r.repeat_ms) == 2 and r.ms_min <= r.ms_per_iter <= r.ms_max
        # measured: 0 on all 13 rows (the same formula); approx's default rel 1e-6
        assert r.images_per_s == pytest.approx(r.batch * 1000 / r.ms_per_iter)
    infer = [r for r in rows if r.mode == "infer"]
    for b in (1, 2):
        counts = {r.model: r.detections for r in infer if r.batch == b}
        assert len({tuple(c) for c in counts.values()}) == 1, f"every variant finds the same boxes: {counts}"
        assert all(len(c) == b and min(c) > 0 for c in counts.values())
    assert all(r.loss is not None and r.detections is None for r in rows if r.mode == "train")
    assert {r.model: r.channels_last for r in infer if r.batch == 1} == {
        "ours": False, "ours-prepared": True, "ours-static": True, "torchvision": False, "torchvision-cl": True}

    comps = bm.comparisons(rows)
    pairs = {(c.kind, c.mode, c.batch, c.ours, c.torchvision) for c in comps}
    assert ("like for like", "train", 2, "ours", "torchvision") in pairs
    assert ("like for like", "infer", 1, "ours", "torchvision") in pairs
    assert ("like for like", "infer", 1, "ours-prepared", "torchvision-cl") in pairs
    assert not any(c.ours == "ours-static" and c.kind == "like for like" for c in comps), "no torchvision twin"
    assert all(c.ratio_min <= c.ratio <= c.ratio_max and len(c.repeat_ratios) == 2 for c in comps)

    path = bm.write_json(rows, tmp_path / "b.json", bm.environment("cpu"), cfg)
    data = json.loads(path.read_text())
    env = data["environment"]
    assert env["command"] == "resnet-det benchmark --device cpu" and env["date"][:2] == "20"
    assert env["env"]["GLIBC_TUNABLES"] == "glibc.malloc.mmap_threshold=1073741824"
    assert env["env"]["OMP_NUM_THREADS"] == "1" and env["torch_threads"] == 1
    assert {"torch", "torchvision", "cpu", "python"} <= set(env)
    assert (data["config"]["warmup"], data["config"]["iters"], data["config"]["repeats"]) == (1, 2, 2)
    assert len(data["results"]) == len(rows) and len(data["comparisons"]) == len(comps)
    assert bm.result_from_dict(data["results"][0]) == rows[0]


@pytest.mark.usefixtures("single_thread")
def test_memory_is_measured_in_a_process_per_model() -> None:
    cfg = bm.BenchConfig(**{**TINY, "memory": "subprocess"}, models=("ours", "torchvision"))
    peaks = {}
    for model in ("ours", "torchvision"):
        peak, method = bm.measure_memory_subprocess(cfg, "R18-FPN", model, "infer", "fp32", 1, timeout=300)
        assert peak is not None and 0.05 < peak < 16, method
        assert method.startswith("subprocess")
        peaks[model] = peak
    bad = bm.measure_memory_subprocess(cfg, "R18-FPN", "no-such-model", "infer", "fp32", 1, timeout=300)
    assert bad[0] is None and "failed" in bad[1]


def _row(model: str, ms: list[float], **kw) -> bm.Result:
    base = dict(arch="R50-FPN", mode="infer", dtype="fp32", batch=1, height=320, width=480, channels_last=False,
                compile=False, static=False)
    base.update(kw)
    med = sorted(ms)[len(ms) // 2]
    return bm.Result(model, **base, ms_per_iter=med, ms_min=min(ms), ms_max=max(ms), repeat_ms=ms,
                     images_per_s=1000 / med)


def test_ratios_pair_equal_settings_and_label_the_best_pair() -> None:
    rows = [_row("ours", [100, 120, 110]), _row("ours-prepared", [50, 60, 55], channels_last=True),
            _row("torchvision", [200, 180, 220]), _row("torchvision-cl", [100, 90, 110], channels_last=True),
            _row("ours", [10, 10, 10], batch=4)]
    comps = bm.comparisons(rows)
    like = {(c.ours, c.torchvision): c for c in comps if c.kind == "like for like"}
    assert set(like) == {("ours", "torchvision"), ("ours-prepared", "torchvision-cl")}
    c = like[("ours", "torchvision")]
    assert c.repeat_ratios == [2.0, 1.5, 2.0] and (c.ratio, c.ratio_min, c.ratio_max) == (2.0, 1.5, 2.0)
    assert not [c for c in comps if c.kind == "each at its best"], "the best pair is already like for like"
    rows[1] = _row("ours-prepared", [50, 60, 55], channels_last=True, static=True)
    best = [c for c in bm.comparisons(rows) if c.kind == "each at its best"]
    assert [(c.ours, c.torchvision) for c in best] == [("ours-prepared", "torchvision-cl")]
    assert best[0].line().startswith("each at its best: R50-FPN infer fp32 batch 1: ours-prepared / torchvision-cl")


def test_bad_settings_are_refused_with_every_problem_named() -> None:
    with pytest.raises(ValueError, match=r"models \['yolo'\].*memory 'inprocess' \(CUDA only"):
        bm.BenchConfig(models=("yolo",), memory="inprocess", device="cpu")
    with pytest.raises(ValueError, match="repeats=0"):
        bm.BenchConfig(repeats=0)


@pytest.mark.usefixtures("single_thread")
def test_a_failing_variant_is_reported_and_the_others_still_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    build = bm.build_variants

    def failing(arch, names, *args, **kwargs):
        if names == ["torchvision-cl"]:
            raise RuntimeError("no kernel for this setting\nmore detail")
        return build(arch, names, *args, **kwargs)

    monkeypatch.setattr(bm, "build_variants", failing)
    cfg = bm.BenchConfig(**{**TINY, "infer_batches": (1,), "repeats": 1}, models=("ours", "torchvision-cl"),
                         modes=("infer",))
    failures: list[dict[str, str]] = []
    lines: list[str] = []
    rows = bm.run(cfg, log=lines.append, failures=failures)
    assert [r.model for r in rows] == ["ours"]
    assert failures == [{"model": "torchvision-cl", "arch": "R18-FPN", "mode": "infer", "dtype": "fp32", "batch": "1",
                         "error": "RuntimeError: no kernel for this setting"}]
    assert any("torchvision-cl" in line and "FAILED: RuntimeError" in line for line in lines)


def test_the_command_passes_every_setting_and_records_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from resnet_det.cli import main

    seen = {}
    monkeypatch.setattr(bm, "run", lambda **kw: seen.update(kw) or [])
    out = tmp_path / "b.json"
    assert main(["benchmark", "--device", "cpu", "--size", "64", "96", "--model-size", "64", "96", "--repeats", "5",
                 "--models", "ours", "torchvision-cl", "--prepared", "--memory", "off", "--json", str(out)]) == 0
    assert (seen["model_size"], seen["repeats"], seen["memory"], seen["prepared"]) == ((64, 96), 5, "off", True)
    config = json.loads(out.read_text())["config"]
    assert config["models"] == ["ours", "torchvision-cl", "ours-prepared"] and config["model_size"] == [64, 96]
    assert "warm-up 3, 15 timed calls x 5 repeats (interleaved), memory: off" in capsys.readouterr().out
    assert main(["benchmark", "--device", "cpu", "--memory", "inprocess", "--json", str(out)]) == 2
    assert "memory 'inprocess' (CUDA only" in capsys.readouterr().err
