"""The README's "Use it in your detector" snippets are the tested code: each Python block of that section
runs here as it is written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use it in your detector", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_one_snippet_per_library() -> None:
    firsts = [s.splitlines()[0] for s in _snippets()]
    assert [f.split(":")[0].lstrip("# ") for f in firsts] == [
        "timm", "segmentation_models_pytorch", "Hugging Face transformers", "effdet", "torchvision", "export",
        "torchscript"]


@pytest.mark.parametrize("code", _snippets(), ids=lambda c: c.splitlines()[0].lstrip("# ").split(":")[0])
def test_readme_snippet_runs(code: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # snippets that write files (model.onnx) write them here
    exec(compile(code, str(README), "exec"), {"__name__": "readme_snippet"})
    printed = capsys.readouterr().out
    if "feature_info" in code:
        assert "[256, 512, 1024, 2048] [4, 8, 16, 32]" in printed
    if "ort.InferenceSession" in code:
        assert printed.splitlines()[-2:] == ["4 float32 int64"] * 2  # after torch.onnx's own progress lines
    if "torch.jit.script" in code:
        assert printed.splitlines()[-1] == "['boxes', 'labels', 'scores']"
    if "smp.Unet" in code:
        assert "torch.Size([2, 3, 64, 64])" in printed
    if "detr(" in code:
        assert re.search(r"tensor\(\d+\.\d+", printed)
