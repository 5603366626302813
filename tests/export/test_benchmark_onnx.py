"""`resnet-det benchmark` has an ONNX Runtime row (`ours-onnx`) beside eager / prepared, on the same images,
threads and repeats (timings are reported, never asserted)."""

from __future__ import annotations

import pytest

import resnet_det.studies.benchmark as bm


@pytest.mark.slow
def test_the_onnx_runtime_row_is_measured_beside_eager(single_thread) -> None:
    cfg = bm.BenchConfig(archs=("R18-FPN",), dtypes=("fp32", "bf16"), device="cpu", height=64, width=96,
                         infer_batches=(2,), iters=2, warmup=1, repeats=2, model_size=(64, 96), memory="off",
                         models=("ours", "ours-onnx"), modes=("infer",))
    failures: list[dict[str, str]] = []
    lines: list[str] = []
    rows = bm.run(cfg, log=lines.append, failures=failures)
    assert not failures, failures
    got = {(r.model, r.dtype) for r in rows}
    assert got == {("ours", "fp32"), ("ours", "bf16"), ("ours-onnx", "fp32")}, "the exported graph runs in fp32 only"
    onnx_row = next(r for r in rows if r.model == "ours-onnx")
    eager = next(r for r in rows if r.model == "ours" and r.dtype == "fp32")
    assert len(onnx_row.repeat_ms) == len(eager.repeat_ms) == 2 and onnx_row.batch == eager.batch == 2
    assert onnx_row.detections is not None and len(onnx_row.detections) == 2 and min(onnx_row.detections) > 0
    assert any(line.startswith("ours-onnx") for line in lines)
