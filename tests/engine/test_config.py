"""Config loading: one-level _base_, overrides of every type, key/type errors, dump/load round trip."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from detection.specs import FPN_ANCHOR_SIZES, ModelSpec
from resnet_det.config import (
    Config,
    SolverConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_overrides,
)


def _write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def test_defaults_are_the_papers_values():
    cfg = Config()
    assert isinstance(cfg.model, ModelSpec)  # the model section is the builders' schema itself
    assert cfg.model.rpn.anchor_sizes is None and FPN_ANCHOR_SIZES == ((32,), (64,), (128,), (256,), (512,))
    assert cfg.model.roi.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0)
    assert (cfg.solver.lr, cfg.solver.ims_per_batch, cfg.solver.steps) == (0.02, 16, (60000, 80000))
    assert cfg.train.amp == "off" and cfg.data.root is None


def test_base_is_merged_recursively_relative_to_the_file(tmp_path, monkeypatch):
    _write(tmp_path / "cfgs" / "base" / "common.yaml", {
        "model": {"backbone": {"name": "resnet101"}, "rpn": {"nms_thresh": 0.6, "fg_iou": 0.75}},
        "solver": {"lr": 0.01, "steps": [10, 20, 30]},
    })
    child = _write(tmp_path / "cfgs" / "child.yaml", {
        "_base_": "base/common.yaml",
        "model": {"rpn": {"fg_iou": 0.8}},
        "solver": {"lr": 0.005, "steps": [5]},
    })
    monkeypatch.chdir(tmp_path)  # the base path must resolve against the file, not the cwd
    cfg = load_config(child)
    assert cfg.model.backbone.name == "resnet101"  # from the base
    assert cfg.model.rpn.nms_thresh == 0.6  # base value inside a merged sub-mapping
    assert cfg.model.rpn.fg_iou == 0.8  # child wins
    assert cfg.solver.lr == 0.005
    assert cfg.solver.steps == (5,)  # lists replace, they do not merge
    assert cfg.model.rpn.bg_iou == 0.3  # untouched default


def test_two_levels_of_base_is_an_error_naming_both_files(tmp_path):
    _write(tmp_path / "a.yaml", {"solver": {"lr": 0.1}})
    _write(tmp_path / "b.yaml", {"_base_": "a.yaml", "solver": {"lr": 0.2}})
    c = _write(tmp_path / "c.yaml", {"_base_": "b.yaml"})
    with pytest.raises(ValueError, match="one level") as err:
        load_config(c)
    assert "c.yaml" in str(err.value) and "b.yaml" in str(err.value)


def test_missing_base_file_is_reported(tmp_path):
    c = _write(tmp_path / "c.yaml", {"_base_": "nope.yaml"})
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(c)


def test_overrides_of_each_type(tmp_path):
    path = _write(tmp_path / "c.yaml", {"solver": {"lr": 0.02}})
    cfg = load_config(path, [
        "solver.max_iter=1234",  # int
        "solver.lr=0.5",  # float
        "solver.momentum=1",  # int accepted for float
        "solver.weight_decay=1e-4",  # YAML 1.1 reads this as a string; float fields accept it
        "train.channels_last=true",  # bool
        "model.backbone.name=resnet101",  # str
        "train.amp=bf16",  # Literal
        "model.weights=null",  # None
        "solver.clip_grad_norm=5",  # float | None given an int
        "model.num_classes=7",  # int | None
        "solver.steps=[100,200]",  # tuple[int, ...]
        "model.rpn.aspect_ratios=[1, 2.5]",  # tuple[float, ...] with an int inside
        "model.rpn.anchor_sizes=[[16, 24], [48]]",  # tuple[tuple[float, ...], ...] | None
        "model.rpn.pre_nms_topk=[100, 50]",  # tuple[int, int]: (train, test)
        "model.roi={fc_dim: 512, box_head: 4conv1fc}",  # a whole sub-mapping merges
    ])
    assert cfg.solver.max_iter == 1234 and isinstance(cfg.solver.max_iter, int)
    assert cfg.solver.lr == 0.5
    assert cfg.solver.momentum == 1.0 and isinstance(cfg.solver.momentum, float)
    assert cfg.solver.weight_decay == 1e-4 and isinstance(cfg.solver.weight_decay, float)
    assert cfg.train.channels_last is True
    assert cfg.model.backbone.name == "resnet101"
    assert cfg.train.amp == "bf16"
    assert cfg.model.weights is None
    assert cfg.solver.clip_grad_norm == 5.0 and isinstance(cfg.solver.clip_grad_norm, float)
    assert cfg.model.num_classes == 7
    assert cfg.solver.steps == (100, 200)
    assert cfg.model.rpn.aspect_ratios == (1.0, 2.5) and isinstance(cfg.model.rpn.aspect_ratios[0], float)
    assert cfg.model.rpn.anchor_sizes == ((16, 24), (48,))
    assert cfg.model.rpn.pre_nms_topk == (100, 50)
    assert (cfg.model.roi.fc_dim, cfg.model.roi.box_head, cfg.model.roi.pooler_resolution) == (512, "4conv1fc", None)


def test_override_later_wins_and_beats_the_file(tmp_path):
    path = _write(tmp_path / "c.yaml", {"solver": {"lr": 0.02}})
    cfg = load_config(path, ["solver.lr=0.1", "solver.lr=0.3"])
    assert cfg.solver.lr == 0.3


def test_unknown_key_error_names_the_dotted_key_and_suggests(tmp_path):
    path = _write(tmp_path / "c.yaml", {"solver": {"momentun": 0.8}})
    with pytest.raises(ValueError) as err:
        load_config(path)
    msg = str(err.value)
    assert "'solver.momentun'" in msg and "did you mean 'solver.momentum'" in msg and "c.yaml" in msg

    ok = _write(tmp_path / "ok.yaml", {})
    with pytest.raises(ValueError) as err:
        load_config(ok, ["model.rpn.nms_tresh=0.5"])
    assert "'model.rpn.nms_tresh'" in str(err.value) and "'model.rpn.nms_thresh'" in str(err.value)
    assert "model.rpn.nms_tresh=0.5" in str(err.value)  # says where it was set

    with pytest.raises(ValueError) as err:
        load_config(ok, ["train.lr=0.1"])  # right name, wrong section
    assert "did you mean 'solver.lr'" in str(err.value)

    with pytest.raises(ValueError, match=r"'solvr'.*did you mean 'solver'"):
        load_config(ok, ["solvr.lr=0.1"])


def test_wrong_type_error_names_key_value_type_and_expected(tmp_path):
    path = _write(tmp_path / "c.yaml", {"solver": {"max_iter": "lots"}})
    with pytest.raises(TypeError) as err:
        load_config(path)
    msg = str(err.value)
    assert "'solver.max_iter'" in msg and "'lots'" in msg and "type str" in msg and "expected int" in msg
    assert "c.yaml" in msg

    ok = _write(tmp_path / "ok.yaml", {})
    with pytest.raises(TypeError, match=r"'train\.amp'.*'bf17'.*one of 'bf16', 'fp16', 'off'.*did you mean 'bf16'"):
        load_config(ok, ["train.amp=bf17"])
    with pytest.raises(TypeError, match=r"'model\.input\.min_size'.*expected tuple\[int, \.\.\.\].*\[800\]"):
        load_config(ok, ["model.input.min_size=800"])
    with pytest.raises(TypeError, match=r"'model\.rpn\.pre_nms_topk'.*give exactly 2 values"):
        load_config(ok, ["model.rpn.pre_nms_topk=[1, 2, 3]"])
    with pytest.raises(TypeError, match=r"'model\.backbone' got 'resnet18'.*section.*model\.backbone\.name"):
        load_config(ok, ["model.backbone=resnet18"])
    with pytest.raises(TypeError, match=r"'model\.rpn\.anchor_sizes\[1\]\[0\]'.*'x'"):
        load_config(ok, ["model.rpn.anchor_sizes=[[32], [x]]"])
    with pytest.raises(TypeError, match=r"'solver\.lr'.*expected float.*solver\.lr\.value=1"):
        load_config(ok, ["solver.lr.value=1"])
    set_lr = _write(tmp_path / "lr.yaml", {"solver": {"lr": 0.1}})
    with pytest.raises(TypeError, match=r"'solver\.lr' is 0\.1.*not a section"):
        load_config(set_lr, ["solver.lr.value=1"])


def test_bool_is_not_int_and_int_is_not_bool(tmp_path):
    ok = _write(tmp_path / "ok.yaml", {})
    with pytest.raises(TypeError, match=r"'solver\.max_iter' got True \(type bool\), expected int"):
        load_config(ok, ["solver.max_iter=true"])
    with pytest.raises(TypeError, match=r"'solver\.lr' got False \(type bool\), expected float"):
        load_config(ok, ["solver.lr=false"])
    with pytest.raises(TypeError, match=r"'train\.tensorboard' got 1 \(type int\), expected bool"):
        load_config(ok, ["train.tensorboard=1"])
    with pytest.raises(TypeError, match=r"'model\.num_classes'.*expected int \| null"):
        load_config(ok, ["model.num_classes=yes"])  # YAML 1.1: `yes` is True


def test_value_out_of_range_names_the_key(tmp_path):
    ok = _write(tmp_path / "ok.yaml", {})
    with pytest.raises(ValueError, match=r"'solver\.steps'.*increasing"):
        load_config(ok, ["solver.steps=[200,100]"])
    with pytest.raises(ValueError, match=r"'train\.keep_checkpoints'"):
        load_config(ok, ["train.keep_checkpoints=0"])


def test_model_range_error_names_the_dotted_key_and_where_it_was_set(tmp_path):
    base = _write(tmp_path / "base.yaml", {"model": {"rpn": {"nms_thresh": 1.5}}})
    child = _write(tmp_path / "child.yaml", {"_base_": "base.yaml", "model": {"roi": {"fc_dim": 64}}})
    with pytest.raises(ValueError, match=r"config key 'model\.rpn\.nms_thresh' = 1\.5 is invalid") as err:
        load_config(child)
    assert f"set in {base}" in str(err.value)  # the base file set it, not the child
    ok = _write(tmp_path / "ok.yaml", {})
    with pytest.raises(ValueError, match=r"'model\.roi\.positive_fraction' = 0\.0.*set by override"):
        load_config(ok, ["model.roi.positive_fraction=0"])


def test_flat_model_keys_point_at_their_section(tmp_path):
    """`<section>_<field>` and a field in the wrong section (the flat layout of older configs) suggest the
    nested key."""
    ok = _write(tmp_path / "ok.yaml", {})
    for flat, nested in (("model.backbone_width=8", "model.backbone.width"),
                         ("model.fpn_channels=8", "model.fpn.channels"),
                         ("model.min_size=[96]", "model.input.min_size"), ("model.norm=GN", "model.backbone.norm")):
        with pytest.raises(ValueError, match=rf"did you mean '{re.escape(nested)}'"):
            load_config(ok, [flat])


def test_bad_override_syntax():
    with pytest.raises(ValueError, match=r"key\.sub=value"):
        parse_overrides(["solver.lr"])
    with pytest.raises(ValueError, match="empty key part"):
        parse_overrides(["solver..lr=1"])
    with pytest.raises(TypeError, match="list"):
        parse_overrides("solver.lr=1")  # type: ignore[arg-type]
    assert parse_overrides(["a.b=[1, 2]", "c=null", "d="]) == [(["a", "b"], [1, 2]), (["c"], None), (["d"], None)]


def test_dump_then_load_gives_an_equal_config(tmp_path):
    cfg = load_config(_write(tmp_path / "c.yaml", {}), [
        "model.rpn.anchor_sizes=[[16, 24], [48]]", "solver.steps=[7, 9]", "solver.lr=3e-3",
        "model.weights=/some/where.safetensors", "train.max_time_minutes=1.5", "data.root=null",
        "solver.clip_grad_norm=2", "train.amp=fp16",
    ])
    out = dump_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    # Plain YAML: tuples are written as lists, readable by any YAML reader.
    raw = yaml.safe_load(out.read_text())
    assert raw["model"]["rpn"]["anchor_sizes"] == [[16, 24], [48]]
    assert not list(out.parent.glob(".*"))  # no temporary file left behind


def test_config_from_dict_and_custom_schema():
    @dataclasses.dataclass
    class Small:
        model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
        solver: SolverConfig = dataclasses.field(default_factory=SolverConfig)

    cfg = config_from_dict({"solver": {"lr": 0.1}}, schema=Small)
    assert isinstance(cfg, Small) and cfg.solver.lr == 0.1
    with pytest.raises(ValueError, match="'train'"):
        config_from_dict({"train": {}}, schema=Small)
