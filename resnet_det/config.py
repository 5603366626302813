"""Experiment configs: YAML files parsed into typed dataclasses.

A config file is a YAML mapping with the sections of :class:`Config` (``model``, ``data``,
``solver``, ``train``). It may start from one other file with ``_base_: other.yaml`` (a path
relative to the file): mappings are merged recursively, any other value replaces the base's.
Only one level of inheritance is allowed, so the value that wins is always visible in at most two
files (the deep chains of mmdetection configs are the counter-example). Command-line overrides
``key.sub=value`` are applied last; each value is parsed with ``yaml.safe_load``, so
``train.amp=bf16``, ``solver.steps=[100,200]`` and ``model.weights=null`` all work.

The ``model`` section is :class:`detection.specs.ModelSpec` itself (nested: ``model.backbone.name``,
``model.rpn.nms_thresh``, ``model.input.min_size``, ...): the builders read it as it is, with no copy
into another schema.

Every key and value is checked against the dataclass schema: an unknown key or a value of the wrong
type raises an error that names the full dotted key, the value given and its type, the type
expected, where it was set, and close matches for typos.

Example::

    cfg = load_config("configs/coco/faster_rcnn_R_50_FPN_1x.yaml", ["solver.max_iter=1000"])
    cfg.solver.lr          # 0.02
    dump_config(cfg, "output/run/config.yaml")   # load_config reads it back to an equal object

To add a field, add it to the dataclass with a default and a one-line docstring after it; the
loader, the type checks and :func:`dump_config` pick it up with no other change.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from detection.specs import ModelSpec
from resnet_det_common import atomic_write, check

__all__ = [
    "Config",
    "DataConfig",
    "EmaConfig",
    "EvalConfig",
    "SolverConfig",
    "TTAConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_overrides",
]

BASE_KEY = "_base_"

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


def _check(cond: bool, key: str, value: Any, requirement: str) -> None:
    """Raises a ValueError naming the dotted key when a value is out of its allowed range."""
    check(cond, key, value, requirement)


@dataclass
class DataConfig:
    """Datasets, augmentation and loading."""

    root: str | None = None
    """Dataset folder (in ``format``'s layout); None uses the built-in synthetic shapes dataset."""
    format: str = "coco"
    """Layout of ``root``: coco, yolo (``data.yaml``, ``images/``, ``labels/``), voc (``Annotations/``,
    ``JPEGImages/``, ``ImageSets/Main/``); see resnet_det.data.formats."""
    train_images: str = "train2017"
    """Training images folder, relative to root."""
    train_annotations: str = "annotations/instances_train2017.json"
    """Training annotations (COCO JSON), relative to root."""
    val_images: str = "val2017"
    """Validation images folder, relative to root."""
    val_annotations: str = "annotations/instances_val2017.json"
    """Validation annotations (COCO JSON), relative to root."""
    keep_empty_train: bool = False
    """Keep training images without annotations (as negatives) instead of dropping them."""
    num_workers: int = 4
    """Data loader worker processes per training process."""
    hflip_prob: float = 0.5
    """Probability of a horizontal flip during training."""
    lsj: bool = False
    """Large-scale jitter (random resize 0.1-2.0 and crop) instead of the min/max size resize."""
    photometric: bool = False
    """Random brightness / contrast / saturation / hue changes during training."""
    aspect_grouping: bool = True
    """Batch images of the same orientation together (less padding)."""
    shapes_num_train: int = 1000
    """Synthetic shapes: number of training images."""
    shapes_num_val: int = 200
    """Synthetic shapes: number of validation images."""
    shapes_image_size: int = 256
    """Synthetic shapes: image side in pixels."""
    shapes_seed: int = 0
    """Synthetic shapes: generator seed (same seed, same dataset)."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        from .data.formats import format_names

        _check(self.format in format_names(), "data.format", self.format, f"must be one of {list(format_names())}")
        _check(0.0 <= self.hflip_prob <= 1.0, "data.hflip_prob", self.hflip_prob, "must be in [0, 1]")
        _check(self.shapes_num_train > 0 and self.shapes_num_val > 0, "data.shapes_num_train/val",
               (self.shapes_num_train, self.shapes_num_val), "must be > 0")
        _check(self.shapes_image_size >= 32, "data.shapes_image_size", self.shapes_image_size,
               "must be >= 32")


@dataclass
class SolverConfig:
    """Optimizer and learning-rate schedule (detectron2's 1x schedule at batch 16)."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    """SGD with momentum, or AdamW."""
    lr: float = 0.02
    """Base learning rate (for ims_per_batch, or for reference_batch_size if that is set)."""
    momentum: float = 0.9
    """SGD momentum (ignored by AdamW)."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""
    adamw_betas: tuple[float, ...] = (0.9, 0.999)
    """AdamW betas (ignored by SGD)."""
    weight_decay: float = 1e-4
    """Weight decay of the weights."""
    weight_decay_norm: float = 0.0
    """Weight decay of normalisation layers' scales and shifts (usually 0)."""
    weight_decay_bias: float | None = None
    """Weight decay of biases outside norm layers; None means the same as weight_decay."""
    ims_per_batch: int = 16
    """Images per iteration over all processes (the global batch)."""
    reference_batch_size: int | None = None
    """If set, lr is for this batch and is scaled linearly by ims_per_batch / reference_batch_size."""
    max_iter: int = 90000
    """Training iterations."""
    scheduler: Literal["multistep", "cosine"] = "multistep"
    """Step decay at `steps`, or cosine decay to 0 at max_iter."""
    steps: tuple[int, ...] = (60000, 80000)
    """Iterations at which the multistep schedule multiplies the lr by gamma."""
    gamma: float = 0.1
    """Factor of each multistep decay."""
    warmup_iters: int = 1000
    """Iterations of linear warmup."""
    warmup_factor: float = 0.001
    """lr multiplier at iteration 0, rising linearly to 1 at warmup_iters."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm to this value; None disables clipping."""
    accumulate: int = 1
    """Gradient accumulation: each iteration (optimizer step) runs this many forward/backward passes of
    ims_per_batch / accumulate images each; ims_per_batch stays the images per optimizer step."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "solver.lr", self.lr, "must be > 0")
        _check(self.momentum >= 0, "solver.momentum", self.momentum, "must be >= 0")
        _check(len(self.adamw_betas) == 2 and all(0 <= b < 1 for b in self.adamw_betas),
               "solver.adamw_betas", self.adamw_betas, "give two values in [0, 1)")
        _check(self.weight_decay >= 0 and self.weight_decay_norm >= 0, "solver.weight_decay(_norm)",
               (self.weight_decay, self.weight_decay_norm), "must be >= 0")
        _check(self.weight_decay_bias is None or self.weight_decay_bias >= 0, "solver.weight_decay_bias",
               self.weight_decay_bias, "must be >= 0 or null")
        _check(self.ims_per_batch > 0, "solver.ims_per_batch", self.ims_per_batch, "must be > 0")
        _check(self.reference_batch_size is None or self.reference_batch_size > 0,
               "solver.reference_batch_size", self.reference_batch_size, "must be > 0 or null")
        _check(self.max_iter > 0, "solver.max_iter", self.max_iter, "must be > 0")
        _check(all(s > 0 for s in self.steps), "solver.steps", self.steps, "steps must be > 0")
        _check(list(self.steps) == sorted(set(self.steps)), "solver.steps", self.steps,
               "steps must be strictly increasing, e.g. [60000, 80000]")
        _check(self.gamma > 0, "solver.gamma", self.gamma, "must be > 0")
        _check(self.warmup_iters >= 0, "solver.warmup_iters", self.warmup_iters, "must be >= 0")
        _check(0.0 < self.warmup_factor <= 1.0, "solver.warmup_factor", self.warmup_factor,
               "must be in (0, 1]")
        _check(self.clip_grad_norm is None or self.clip_grad_norm > 0, "solver.clip_grad_norm",
               self.clip_grad_norm, "must be > 0, or null to disable clipping")
        _check(self.accumulate >= 1, "solver.accumulate", self.accumulate, "must be >= 1 (1 = no accumulation)")
        _check(self.ims_per_batch % self.accumulate == 0, "solver.ims_per_batch", self.ims_per_batch,
               f"must be divisible by solver.accumulate={self.accumulate} (ims_per_batch is the images per "
               "optimizer step, each pass loads ims_per_batch / accumulate)")

    @property
    def scaled_lr(self) -> float:
        """The learning rate after linear scaling by ims_per_batch / reference_batch_size."""
        if self.reference_batch_size is None:
            return self.lr
        return self.lr * self.ims_per_batch / self.reference_batch_size


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (timm's ModelEmaV3), updated after every optimizer step."""

    decay: float = 0.9998
    """Decay once warmed up: ema = decay * ema + (1 - decay) * weights."""
    warmup_iters: int = 2000
    """Decay warm-up: decay * (1 - exp(-t / warmup_iters)) at optimizer step t; 0 = none."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.decay < 1.0, "train.ema.decay", self.decay, "must be in [0, 1), e.g. 0.9998")
        _check(self.warmup_iters >= 0, "train.ema.warmup_iters", self.warmup_iters, "must be >= 0 (0 = no warm-up)")


@dataclass
class TTAConfig:
    """Test-time augmentation of ``resnet-det eval`` (the config's ``test.aug``): the detector runs once per
    test size and flip, and the detections of all runs are merged (see detection.tta)."""

    flip: bool = False
    """Also run each test size on the horizontally flipped image."""
    min_sizes: tuple[int, ...] = ()
    """Shorter sides to test at, e.g. [400, 500, 600]; [] = the model's test size (model.input.test_min_size)."""
    max_size: int | None = None
    """Cap on the longer side at every test size; null = the model's (model.input.test_max_size)."""

    def __post_init__(self) -> None:
        _check(all(s > 0 for s in self.min_sizes), "test.aug.min_sizes", list(self.min_sizes),
               "every size must be > 0 (shorter sides in pixels, e.g. [400, 500, 600]; [] = the model's test size)")
        _check(len(set(self.min_sizes)) == len(self.min_sizes), "test.aug.min_sizes", list(self.min_sizes),
               "list each size once (a repeated size runs the same augmentation twice)")
        _check(self.max_size is None or self.max_size > 0, "test.aug.max_size", self.max_size,
               "must be > 0 (the longer side's cap in pixels), or null for the model's test_max_size")

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is asked for (False: the model runs as it is, bit for bit)."""
        return self.flip or bool(self.min_sizes) or self.max_size is not None


@dataclass
class EvalConfig:
    """Evaluation settings (the config's ``test`` section)."""

    use_ema: bool = False
    """Evaluate (during training and with resnet-det eval on a checkpoint) the EMA weights of train.ema."""
    aug: TTAConfig = field(default_factory=TTAConfig)
    """Test-time augmentation of resnet-det eval ({flip, min_sizes, max_size}); the default is none. Evaluation
    during training always runs the plain model."""
    metrics: list[str] = field(default_factory=list)
    """Metrics by name run beside the task's own evaluators (resnet_det.evaluation.registry), e.g. [detections]."""

    def __post_init__(self) -> None:
        from .evaluation.registry import metric_names

        known = metric_names()
        for name in self.metrics:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            _check(name in known, "test.metrics", name, f"is not a metric{hint}; known: {', '.join(known)}")
        _check(len(set(self.metrics)) == len(self.metrics), "test.metrics", self.metrics, "lists a metric twice")


@dataclass
class TrainConfig:
    """Run settings: output, device, precision, checkpoints, evaluation and logging."""

    output_dir: str = "output/run"
    """Folder for checkpoints, config.yaml, metrics.jsonl, log.txt and curves.png."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda", or "cuda:N"."""
    amp: Literal["bf16", "fp16", "off"] = "off"
    """Mixed precision: bf16 autocast, fp16 autocast with a gradient scaler, or fp32."""
    channels_last: bool = False
    """Keep convolution weights and activations in channels_last (NHWC) memory format."""
    compile: bool = False
    """Compile the model (backbone + FPN) with torch.compile."""
    checkpoint_period: int = 5000
    """Save a checkpoint every this many iterations (and always at the end)."""
    keep_checkpoints: int = 3
    """Periodic checkpoints kept on disk (older ones are deleted; the final one is always kept)."""
    eval_period: int = 0
    """Evaluate every this many iterations; 0 = only at the end."""
    log_period: int = 20
    """Log averaged losses, lr and speed every this many iterations."""
    seed: int = 42
    """Random seed (each process adds its rank)."""
    tensorboard: bool = False
    """Also write TensorBoard events (needs the tensorboard extra)."""
    max_time_minutes: float | None = None
    """Stop cleanly (checkpoint, evaluate) once training has run this long; None = no limit."""
    dist_timeout_minutes: float = 10.0
    """With several processes: how long a collective waits for a process that stopped answering before
    every other process fails with a clear error (torch's own default is 30 minutes)."""
    ema: EmaConfig | None = None
    """EMA of the weights ({decay, warmup_iters}; {} for the defaults); null = none. Stored in checkpoints,
    model_final_ema.safetensors at the end."""

    def __post_init__(self) -> None:
        _check(self.checkpoint_period > 0, "train.checkpoint_period", self.checkpoint_period, "must be > 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _check(self.eval_period >= 0, "train.eval_period", self.eval_period, "must be >= 0 (0 = at the end)")
        _check(self.log_period > 0, "train.log_period", self.log_period, "must be > 0")
        _check(self.max_time_minutes is None or self.max_time_minutes > 0, "train.max_time_minutes",
               self.max_time_minutes, "must be > 0, or null for no limit")
        _check(self.dist_timeout_minutes > 0, "train.dist_timeout_minutes", self.dist_timeout_minutes,
               "must be > 0 (minutes a collective waits for a silent process)")
        _check(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None, "train.device",
               self.device, 'use "auto", "cpu", "cuda" or "cuda:N"')


@dataclass
class Config:
    """A whole experiment."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """The model (detection.specs.ModelSpec: the builders read this section as it is)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and loading."""
    solver: SolverConfig = field(default_factory=SolverConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run settings."""
    test: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation settings."""


# --------------------------------------------------------------------------------------------------
# Type checking and conversion
# --------------------------------------------------------------------------------------------------

_UNION_TYPES: tuple[Any, ...] = (Union, types.UnionType)
# YAML 1.1 (PyYAML) reads "1e-4" as a string: it wants a dot in the mantissa. Float fields accept
# such strings so that `weight_decay: 1e-4` means what everyone expects.
_FLOAT_STRING = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _UnknownKey(ValueError):
    """Internal: a key that the schema does not have (carries the dotted key for context)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class _Mismatch(Exception):
    """Internal: a value does not match a type (turned into a TypeError with context)."""

    def __init__(self, key: str, value: Any, expected: str, hint: str = "") -> None:
        super().__init__(key)
        self.key = key
        self.value = value
        self.expected = expected
        self.hint = hint


def _type_name(tp: Any) -> str:
    """A readable name for a type annotation, e.g. 'tuple[int, ...]' or 'str | None'."""
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in _UNION_TYPES:
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None and args:
        parts = ["..." if a is Ellipsis else _type_name(a) for a in args]
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(parts)}]"
    return str(tp)


def _value_desc(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (type {type(value).__name__})"


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (the module uses `from __future__ import annotations`)."""
    module = sys.modules.get(cls.__module__)
    hints = typing.get_type_hints(cls, globalns=vars(module) if module else None)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema, sections included."""
    keys = []
    for name, tp in _field_types(cls).items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, dotted + "."))
    return keys


def _unknown_key_message(key: str, name: str, cls: type, root: type, section: str) -> str:
    """Error text for an unknown key, with close matches in its section and elsewhere."""
    fields = list(_field_types(cls))
    prefix = key[: -len(name)]
    close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
    if not close:
        # difflib misses short names with a suffix (`lr_rate` for `lr`): try prefixes too.
        close = [f for f in fields if len(f) >= 2 and (name.startswith(f) or f.startswith(name))]
    suggestions = [prefix + m for m in close]
    # `<section>_<field>` for `<section>.<field>` (the flat spelling of ModelSpec.replace, and older configs).
    for sub, tp in _field_types(cls).items():
        rest = name[len(sub) + 1:] if name.startswith(sub + "_") else ""
        if rest and dataclasses.is_dataclass(tp) and rest in _field_types(tp):
            suggestions.insert(0, f"{prefix}{sub}.{rest}")
    # A right name in the wrong section (`train.lr` for `solver.lr`) is a common slip too.
    for other in _all_keys(root):
        if other.rsplit(".", 1)[-1] == name and other != key and other not in suggestions:
            suggestions.append(other)
    msg = f"unknown config key '{key}'"
    if suggestions:
        msg += "; did you mean " + " or ".join(f"'{s}'" for s in suggestions[:4]) + "?"
    where = f"section '{section}'" if section else "the top level"
    msg += f" Valid keys in {where}: {', '.join(fields)}."
    return msg


def _convert(value: Any, tp: Any, key: str, root: type) -> Any:
    """Checks `value` against the annotation `tp` and returns it in canonical form.

    Sequences become tuples or lists as annotated, ints become floats for float fields, and
    mappings become dataclasses. Raises _Mismatch (a wrong type) or ValueError (an unknown key).
    """
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            names = list(_field_types(tp))
            raise _Mismatch(key, value, f"a mapping of {tp.__name__} fields",
                            f"'{key}' is a section: set one of its fields, e.g. {key}.{names[0]}=... "
                            f"(fields: {', '.join(names)})")
        return _build_dataclass(tp, value, key, root)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in _UNION_TYPES:
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # `X | None`: an error inside X names the exact item (`key[1][0]`)
            try:
                return _convert(value, others[0], key, root)
            except _Mismatch as err:
                if err.key != key:
                    raise
                raise _Mismatch(key, value, _type_name(tp), err.hint) from None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, root)
            except _Mismatch:
                continue
        raise _Mismatch(key, value, _type_name(tp))
    if origin is Literal:
        # `True == 1`, so compare types too: a bool must not pass for a Literal[1].
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
        # YAML 1.1 reads a bare `off` / `on` as a boolean: `train.amp: off` means the string.
        if isinstance(value, bool) and ("on" if value else "off") in args:
            return "on" if value else "off"
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [a for a in args if isinstance(a, str)], n=1)
            hint = f"did you mean {close[0]!r}?" if close else ""
        raise _Mismatch(key, value, _type_name(tp), hint)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            example = "[800]" if origin is tuple else "[...]"
            raise _Mismatch(key, value, _type_name(tp), f"write a list, e.g. {example}")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]", root) for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise _Mismatch(key, value, _type_name(tp), f"give exactly {len(args)} values")
            items = [_convert(v, a, f"{key}[{i}]", root) for i, (v, a) in enumerate(zip(value, args))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch(key, value, _type_name(tp))
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(k, key_tp, f"{key}.<key>", root): _convert(v, val_tp, f"{key}.{k}", root)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        hint = "write true or false" if value in (0, 1, "yes", "no", "True", "False") else ""
        raise _Mismatch(key, value, "bool", hint)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        hint = ""
        if isinstance(value, float) and value.is_integer():
            hint = f"write {int(value)} without the decimal point"
        raise _Mismatch(key, value, "int", hint)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_STRING.fullmatch(value.strip()):
            return float(value)
        raise _Mismatch(key, value, "float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch(key, value, "str", f"quote it to make it a string: '{value}'")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch(key, value, _type_name(tp))
    raise TypeError(f"config schema: unsupported annotation {tp!r} for key '{key}'")


def _build_dataclass(cls: type[T], values: Mapping[str, Any], prefix: str, root: type) -> T:
    types_ = _field_types(cls)
    dotted_prefix = f"{prefix}." if prefix else ""
    for name in values:
        if not isinstance(name, str):
            raise TypeError(f"config key {name!r} under '{prefix or '<top level>'}' must be a string")
        if name not in types_:
            dotted = dotted_prefix + name
            raise _UnknownKey(dotted, _unknown_key_message(dotted, name, cls, root, prefix))
    kwargs = {name: _convert(v, types_[name], dotted_prefix + name, root) for name, v in values.items()}
    return cls(**kwargs)


def _mismatch_error(err: _Mismatch, origins: Mapping[str, str] | None = None) -> TypeError:
    msg = f"config key '{err.key}' got {_value_desc(err.value)}, expected {err.expected}"
    source = _origin_of(err.key, origins) if origins else None
    if source:
        msg += f" (set {source})"
    if err.hint:
        msg += f"; {err.hint}"
    return TypeError(msg)


def config_from_dict(data: Mapping[str, Any], *, schema: type[T] = Config) -> T:  # type: ignore[assignment]
    """Builds a typed config from plain (YAML-like) data, checking every key and type.

    Args:
        data: Nested mappings of plain values; missing keys take the schema's defaults.
        schema: The dataclass to build (``Config`` unless a tool has its own).

    Returns:
        An instance of ``schema``.

    Raises:
        ValueError: An unknown key (the message names the dotted key and close matches), or a
            value out of its allowed range.
        TypeError: A value of the wrong type (the message names the key, the value, its type and
            the type expected).
    """
    if not isinstance(data, Mapping):
        raise TypeError(f"a config must be a mapping of sections, got {_value_desc(data)}")
    try:
        return _build_dataclass(schema, data, "", schema)
    except _Mismatch as err:
        raise _mismatch_error(err) from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Converts a config dataclass to plain nested dicts/lists (tuples become lists), e.g. for YAML."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict expects a config dataclass instance, got {type(cfg).__name__}")

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


# --------------------------------------------------------------------------------------------------
# Files, inheritance and overrides
# --------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TypeError(f"config file {path} must contain a mapping of sections, got {_value_desc(data)}")
    return data


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _record_origins(data: Mapping[str, Any], source: str, origins: dict[str, str], prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        origins[dotted] = source
        if isinstance(value, Mapping):
            _record_origins(value, source, origins, dotted + ".")


def _origin_of(key: str, origins: Mapping[str, str]) -> str | None:
    # "a.b[2]" and "a.b" both come from wherever "a.b" (or its closest set parent) was set.
    key = key.split("[", 1)[0]
    if key not in origins:
        # An override `a.b.c=1` that turned the float `a.b` into a mapping is reported at `a.b`.
        for other, source in origins.items():
            if other.startswith(key + "."):
                return source
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return None


def parse_overrides(overrides: Iterable[str]) -> list[tuple[list[str], Any]]:
    """Parses command-line overrides ``key.sub=value`` into (key path, value) pairs.

    The value is parsed with ``yaml.safe_load``: ``8`` is an int, ``0.01`` a float, ``[1,2]`` a
    list, ``null`` is None, ``bf16`` a string. An empty value (``key=``) is None.

    Raises:
        ValueError: An override without ``=``, with an empty key part, or an unparsable value.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'key=value' strings, got the string {overrides!r}")
    parsed = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(
                f"config override {item!r} must look like key.sub=value, e.g. solver.lr=0.01"
            )
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise ValueError(f"config override {item!r} has an empty key part; write e.g. solver.lr=0.01")
        if parts[0] == BASE_KEY:
            raise ValueError(f"config override {item!r}: '{BASE_KEY}' can only be set in a config file")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"config override {item!r}: the value is not valid YAML ({err})") from None
        parsed.append(([p.strip() for p in parts], value))
    return parsed


def _apply_override(data: dict[str, Any], parts: list[str], value: Any, raw: str) -> dict[str, Any]:
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    # Walk the path first so that overriding inside a non-mapping value is reported clearly.
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None and not isinstance(node, Mapping):
            dotted = ".".join(parts[: i + 1])
            raise TypeError(f"config override {raw!r}: '{dotted}' is {_value_desc(node)}, not a section")
        if node is None:
            break
    return _merge(data, nested)


def load_config(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    schema: type[T] = Config,  # type: ignore[assignment]
) -> T:
    """Loads a YAML config, its optional ``_base_``, and command-line overrides, into ``schema``.

    Args:
        path: The YAML file.
        overrides: ``key.sub=value`` strings applied after the files, in order.
        schema: The dataclass to build.

    Returns:
        The typed config.

    Raises:
        FileNotFoundError: The file or its base does not exist.
        ValueError: A base that has a base itself (both files are named), an unknown key, a bad
            override, or a value out of range.
        TypeError: A value of the wrong type.
    """
    path = Path(path)
    data = _read_yaml(path)
    origins: dict[str, str] = {}
    base_ref = data.pop(BASE_KEY, None)
    if base_ref is not None:
        if not isinstance(base_ref, str):
            raise TypeError(f"'{BASE_KEY}' in {path} must be one file name, got {_value_desc(base_ref)}")
        base_path = (path.parent / base_ref).resolve()
        if not base_path.is_file():
            raise FileNotFoundError(
                f"config {path}: its {BASE_KEY} file {base_ref!r} was not found at {base_path}"
            )
        base = _read_yaml(base_path)
        if BASE_KEY in base:
            raise ValueError(
                f"config {path} inherits from {base_path}, which itself has '{BASE_KEY}: "
                f"{base[BASE_KEY]}'; only one level of {BASE_KEY} is allowed. Copy the values you need "
                f"into {base_path.name} or into {path.name}."
            )
        _record_origins(base, f"in {base_path}", origins)
        _record_origins(data, f"in {path}", origins)
        data = _merge(base, data)
    else:
        _record_origins(data, f"in {path}", origins)
    for (parts, value), raw in zip(parse_overrides(overrides), overrides):
        data = _apply_override(data, parts, value, raw)
        _record_origins({".".join(parts): value}, f"by override {raw!r}", origins)
    try:
        return _build_dataclass(schema, data, "", schema)
    except _Mismatch as err:
        raise _mismatch_error(err, origins) from None
    except _UnknownKey as err:
        source = _origin_of(err.key, origins)
        raise ValueError(f"{err} (set {source})" if source else str(err)) from None
    except ValueError as err:
        # A range check (`check`) names its dotted key: say which file or override set the value.
        named = re.match(r"config key '([^'/]+)", str(err))
        source = _origin_of(named.group(1), origins) if named else None
        raise ValueError(f"{err} (set {source})" if source else f"{err} (while loading {path})") from None


class _ConfigDumper(yaml.SafeDumper):
    """Sections as blocks, sequences inline (`steps: [60000, 80000]`), for readable resolved configs."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_ConfigDumper.add_representer(list, _represent_list)


def dump_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Writes the resolved config as YAML that :func:`load_config` reads back to an equal object.

    The file is written atomically (:func:`resnet_det_common.atomic_write`), with normal
    permissions, so a reader never sees half a config.

    Args:
        cfg: A config dataclass instance.
        path: Output file; parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Resolved config: every value in force for this run.\n" + yaml.dump(
        config_to_dict(cfg), Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False, width=100
    )
    return atomic_write(path, text)
