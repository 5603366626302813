"""The `resnet-det` command (resnet_det.cli): subcommands, options and overrides in any order, configs by
name or path, `--print-config`, `configs`, one-line errors with exit code 2, and the tools/ wrappers."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from resnet_det.cli import COMMANDS, main
from resnet_det.config import load_config
from resnet_det.config_files import config_description, configs_root, resolve_config, shipped_configs

REPO = Path(__file__).resolve().parents[2]
NAME = "shapes/faster_rcnn_R_50_FPN"
FILE = REPO / "configs" / "shapes" / "faster_rcnn_R_50_FPN.yaml"
OVERRIDES = ["solver.lr=0.01", "train.device=cpu"]


def _parser(command: str):
    return importlib.import_module(f"resnet_det.cli.{COMMANDS[command]}").build_parser(f"resnet-det {command}")


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("argv", [
    ["--resume", "CFG", "a.b=1", "--no-progress", "c=2"],
    ["CFG", "--no-progress", "a.b=1", "c=2", "--resume"],
    ["CFG", "a.b=1", "--resume", "c=2", "--no-progress"],
])
def test_train_options_and_overrides_in_any_order(argv: list[str]) -> None:
    args = _parser("train").parse_intermixed_args(argv)
    assert (args.config, args.overrides, args.resume, args.no_progress) == ("CFG", ["a.b=1", "c=2"], True, True)


def test_eval_infer_and_paper_study_options_and_overrides_in_any_order() -> None:
    ev = _parser("eval").parse_intermixed_args(["--checkpoint", "w.pth", "CFG", "a=1", "--no-progress", "b=2"])
    assert (ev.config, ev.overrides, ev.checkpoint, ev.no_progress) == ("CFG", ["a=1", "b=2"], "w.pth", True)
    inf = _parser("infer").parse_intermixed_args(
        ["--checkpoint", "w", "CFG", "a=1", "--input", "x.jpg", "dir", "--output", "o", "b=2"])
    assert (inf.config, inf.overrides, inf.input, inf.output) == ("CFG", ["a=1", "b=2"], ["x.jpg", "dir"], "o")
    study = _parser("paper-study").parse_intermixed_args(["--resume", "data.root=/c", "--output-dir", "o", "x=1"])
    assert (study.overrides, study.output_dir, study.resume) == (["data.root=/c", "x=1"], "o", True)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    parser = _parser(command)
    assert not [a.dest for a in parser._actions if not a.help], f"{command}: options without help text"
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and f"usage: resnet-det {command}" in capsys.readouterr().out


def test_top_level_help_unknown_command_and_no_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {c} " in out for c in COMMANDS)
    assert main(["trian", NAME]) == 2
    assert "did you mean train" in _one_error_line(capsys)
    assert main([]) == 2 and "commands:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ --print-config
@pytest.mark.parametrize("argv", [
    ["train", NAME, "--print-config", *OVERRIDES],
    ["train", "--print-config", f"{NAME}.yaml", *OVERRIDES],
    ["train", "--no-progress", NAME, OVERRIDES[0], "--print-config", OVERRIDES[1]],
    ["train", str(FILE), *OVERRIDES, "--print-config"],
    ["infer", "--print-config", NAME, *OVERRIDES],
    ["eval", NAME, OVERRIDES[0], "--print-config", OVERRIDES[1]],
])
def test_print_config_loads_back_to_an_equal_config(argv: list[str], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed) == load_config(FILE, OVERRIDES)
    assert yaml.safe_load(printed.read_text())["solver"]["lr"] == 0.01


def test_print_config_applies_base_and_eval_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "coco/mask_rcnn_R_101_FPN_1x", "--print-config", "--output-dir", str(tmp_path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    base = yaml.safe_load((REPO / "configs/coco/faster_rcnn_R_50_FPN_1x.yaml").read_text())
    assert printed["solver"]["max_iter"] == base["solver"]["max_iter"]  # from the _base_ file
    assert printed["train"]["output_dir"] == str(tmp_path)
    assert "resnet101" in yaml.safe_dump(printed["model"])


# --------------------------------------------------------------------------------- configs by name
def test_config_by_name_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for ref in (NAME, f"{NAME}.yaml", f"configs/{NAME}.yaml", str(FILE)):
        assert resolve_config(ref).resolve() == FILE.resolve(), ref
    assert configs_root().resolve() == (REPO / "configs").resolve()  # the checkout's configs/ (editable install)


def test_a_path_wins_over_a_shipped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "shapes" / "faster_rcnn_R_50_FPN.yaml"
    local.parent.mkdir()
    local.write_text("solver:\n  lr: 0.123\n")
    assert resolve_config(f"{NAME}.yaml") == Path(f"{NAME}.yaml")
    assert main(["train", f"{NAME}.yaml", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["solver"]["lr"] == 0.123
    assert main(["train", NAME, "--print-config"]) == 0  # no such file without the suffix: the shipped config
    assert yaml.safe_load(capsys.readouterr().out)["solver"]["lr"] != 0.123


@pytest.mark.parametrize(("ref", "expected"), [
    ("shapes/faster_rcnn_R50", "shapes/faster_rcnn_R_50_FPN"),
    ("faster_rcnn_R_50_FPN", "shapes/faster_rcnn_R_50_FPN"),
    ("coco/mask_rcnn_R_50_FPN", "coco/mask_rcnn_R_50_FPN_1x"),
])
def test_unknown_name_is_exit_2_with_close_matches(ref: str, expected: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", ref, "solver.lr=0.01"]) == 2
    err = _one_error_line(capsys)
    assert err.startswith("resnet-det train: error: ") and repr(ref) in err
    assert expected in err and "resnet-det configs" in err


def test_configs_lists_every_yaml_with_its_first_comment_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line.split(None, 1)[1] if len(line.split()) > 1 else "" for line in lines}
    on_disk = {p.relative_to(REPO / "configs").with_suffix("").as_posix()
               for p in (REPO / "configs").rglob("*.y*ml")}
    assert set(listed) == on_disk == set(shipped_configs())
    assert listed[NAME].startswith("The main job: Faster R-CNN R50-FPN")
    assert main(["configs", "PAPER", "--paths"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert {r[0] for r in rows} == {n for n in on_disk if n.startswith("paper/")}
    assert all(Path(r[1]).is_file() for r in rows)


def test_config_description_is_the_first_comment_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("\n#  Faster R-CNN, tiny.  \n# second line\nmodel: {}\n")
    assert config_description(path) == "Faster R-CNN, tiny."
    path.write_text("model: {}  # not a description\n# late comment\n")
    assert config_description(path) == ""


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(("argv", "needle"), [
    (["train", NAME, "solver.lr=abc"], "solver.lr"),
    (["train", NAME, "solver.lrr=0.1"], "solver.lr"),
    (["train", NAME, "solver.lr"], "key.sub=value"),
    (["train", "/no/such/config.yaml"], "/no/such/config.yaml"),
    (["eval", NAME, "--checkpoint", "/no/such/model.safetensors"], "does not exist"),
    (["infer", "shapes/nope", "--checkpoint", "w", "--input", "x", "--output", "o"], "shapes/nope"),
])
def test_bad_config_override_or_path_is_one_line_exit_2(argv: list[str], needle: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = _one_error_line(capsys)
    assert err.startswith(f"resnet-det {argv[0]}: error: ") and needle in err


def test_invalid_yaml_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver: [1,\n  lr: 2\n")
    assert main(["train", str(bad)]) == 2
    assert str(bad) in _one_error_line(capsys)


def test_infer_needs_checkpoint_input_and_output_unless_printing(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["infer", NAME, "--input", "x.jpg"])
    assert e.value.code == 2 and "--checkpoint, --output" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- tools/*.py
def test_tools_scripts_run_from_any_folder(tmp_path: Path) -> None:
    """The scripts are wrappers of the installed package: no sys.path edits, any working folder."""
    helped = subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: train.py"), helped.stderr
    made = subprocess.run([sys.executable, str(REPO / "tools" / "make_shapes.py"), "shapes", "--num-train", "2",
                           "--num-val", "1", "--image-size", "32"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr
    assert len(list((tmp_path / "shapes").rglob("*.json"))) >= 2
    again = subprocess.run([sys.executable, str(REPO / "tools" / "make_shapes.py"), "shapes"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.startswith("make_shapes.py: error: ")
    assert again.stderr.count("\n") == 1 and "already exists" in again.stderr


# ------------------------------------------------------------------------------------------ benchmark
def test_benchmark_passes_its_options_and_writes_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    import resnet_det.studies.benchmark as bm

    seen = {}
    monkeypatch.setattr(bm, "run", lambda **kw: seen.update(kw) or [])
    out = tmp_path / "b.json"
    assert main(["benchmark", "--device", "cpu", "--size", "64", "96", "--iters", "2", "--arch", "R18-FPN",
                 "--modes", "infer", "--json", str(out)]) == 0
    assert (seen["device"], seen["height"], seen["width"], seen["iters"]) == ("cpu", 64, 96, 2)
    assert (seen["archs"], seen["modes"], seen["which"]) == (["R18-FPN"], ["infer"], ["ours", "torchvision"])
    assert json.loads(out.read_text())["environment"]["device"] == "cpu"
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["benchmark", "--device", "gpu0"]) == 2
    assert "--device 'gpu0'" in _one_error_line(capsys)
    with pytest.raises(SystemExit) as e:
        main(["benchmark", "--iters", "0"])
    assert e.value.code == 2


# -------------------------------------------------------------------------------------------- studies
def test_degradation_study_command_writes_its_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "study"
    assert main(["degradation-study", "--data", "synthetic", "--depths", "8", "--kinds", "resnet", "--iterations",
                 "2", "--batch-size", "16", "--eval-period", "1", "--device", "cpu", "--output-dir", str(out)]) == 0
    assert "| resnet8 |" in (out / "study.md").read_text()
    assert json.loads((out / "study.json").read_text())
    capsys.readouterr()
    assert main(["degradation-study", "--data", "synthetic", "--depths", "9"]) == 2
    assert "6n+2" in _one_error_line(capsys)


def test_paper_study_command_refuses_an_unknown_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["paper-study", "--configs", "paper/faster_rcnn_VGG16_C4", "paper/faster_rcnn_R101",
                 "--output-dir", str(tmp_path / "s")]) == 2
    assert "paper/faster_rcnn_R_101_C4" in _one_error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_ctrl_c_is_exit_130_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from resnet_det.cli import _library

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_library, "train", interrupted)
    assert main(["train", NAME, *OVERRIDES]) == 130
    assert capsys.readouterr().err == "resnet-det train: interrupted\n"


def test_output_piped_into_a_reader_that_closes_early_is_no_traceback(tmp_path: Path) -> None:
    # `resnet-det configs | head -1`: the reader closes the pipe after one line. Python's default is a
    # BrokenPipeError traceback from deep in print(); the command exits like `cat` (141) and says nothing.
    reader = subprocess.Popen(["head", "-c", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    # A pipe buffer holds 64 KiB: ask for more output than that so the writer really meets the closed pipe.
    proc = subprocess.run([sys.executable, "-c", "import sys\nfrom resnet_det.cli import main\n"
                           "sys.exit(max(main(['configs']) for _ in range(400)))"],
                          stdout=reader.stdin, stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=120)
    reader.stdin.close()
    reader.wait(timeout=10)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
