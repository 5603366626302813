"""The `Backbone` contract shared by every trunk and neck of the project."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor, nn

from .shape_spec import ShapeSpec


def shape_str(x: Tensor) -> str:
    """`x.shape` written as a tuple, ``"(2, 3, 64, 64)"`` (TorchScript-compatible, unlike ``tuple(x.shape)``)."""
    return "(" + ", ".join([str(s) for s in x.shape]) + ")"


_F = TypeVar("_F", bound=Callable[..., object])


def resolved_annotations(fn: _F) -> _F:
    """Evaluate `fn`'s postponed (string) annotations in place and return `fn`.

    `torch.fx` copies the annotations of the traced root's `forward` into the generated code; a string such as
    ``"Tensor"`` (``from __future__ import annotations``) becomes a name TorchScript cannot resolve, so a traced
    backbone could not be scripted. Applied to every `forward` that can be a trace root.
    """
    fn.__annotations__ = typing.get_type_hints(fn)
    return fn


def check_image_batch(x: Tensor, where: str) -> Tensor:
    """Raise a clear `ValueError` unless `x` is a `(N, C, H, W)` batch; returns `x` unchanged.

    The check reads the tensor's rank, which `torch.fx` cannot branch on while tracing: every module
    that calls it lists it with `torch.fx.wrap("check_image_batch")`, so a symbolic trace (and
    torchvision's `create_feature_extractor`) records one opaque call node that runs this same check,
    with the same message, when the traced graph runs. Eager, `torch.compile` and TorchScript run it
    as plain code.
    """
    if x.dim() != 4:
        raise ValueError(f"{where} expects a (N, C, H, W) tensor, got shape {shape_str(x)}")
    return x


torch.fx.wrap("check_image_batch")


class FeatureInfo:
    """timm-style description of a backbone's outputs: `channels()`, `reduction()`, `module_name()`."""

    def __init__(self, shapes: dict[str, ShapeSpec]) -> None:
        self._names = list(shapes)
        self._shapes = shapes

    def channels(self, idx: int | None = None) -> list[int] | int:
        vals = [self._shapes[n].channels for n in self._names]
        return vals if idx is None else vals[idx]

    def reduction(self, idx: int | None = None) -> list[int] | int:
        vals = [self._shapes[n].stride for n in self._names]
        return vals if idx is None else vals[idx]

    def module_name(self, idx: int | None = None) -> list[str] | str:
        return list(self._names) if idx is None else self._names[idx]

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"FeatureInfo({self._shapes})"


class Backbone(nn.Module):
    """A module mapping `(N, C, H, W)` images to an ordered `dict[str, Tensor]` of feature maps.

    Subclasses fill `self._out_feature_shapes` (every feature they can produce, computed while the
    layers are built) and `self._out_features` (the selected subset, in order from high to low
    resolution) in `__init__`.
    """

    # TorchScript: the shapes (ShapeSpec dataclasses) and these Python-side properties are not part of any
    # forward; without these lists `torch.jit.script` would try to compile them.
    __jit_ignored_attributes__ = ("_out_feature_shapes",)
    __jit_unused_properties__ = ("out_features", "size_divisibility", "feature_info")

    if TYPE_CHECKING:  # for type checkers only: TorchScript reads class annotations and has no `tuple[str, ...]`
        _out_features: tuple[str, ...]
        _out_feature_shapes: dict[str, ShapeSpec]

    def __init__(self) -> None:
        super().__init__()
        self._type_name = type(self).__name__  # for error messages in forward (TorchScript has no type(self))

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def out_features(self) -> tuple[str, ...]:
        return self._out_features

    def output_shape(self) -> dict[str, ShapeSpec]:
        """`{name: ShapeSpec(channels, stride)}` for each output, in output order."""
        return {n: self._out_feature_shapes[n] for n in self._out_features}

    @property
    def size_divisibility(self) -> int:
        """Inputs padded to a multiple of this give outputs of exactly `H / stride` (0: no constraint)."""
        return max(s.stride for s in self.output_shape().values())

    @property
    def feature_info(self) -> FeatureInfo:
        return FeatureInfo(self.output_shape())

    def _select_out_features(self, out_features: Sequence[str] | None, available: Sequence[str],
                             default: Sequence[str]) -> tuple[str, ...]:
        if out_features is None:
            out_features = default
        if isinstance(out_features, str):
            out_features = (out_features,)
        out_features = tuple(out_features)
        if not out_features:
            raise ValueError(f"out_features is empty; choose a non-empty subset of {tuple(available)}")
        unknown = [n for n in out_features if n not in available]
        if unknown:
            raise ValueError(
                f"out_features={out_features} contains {unknown}, which {type(self).__name__} does not "
                f"produce; choose from {tuple(available)}"
            )
        if len(set(out_features)) != len(out_features):
            raise ValueError(f"out_features={out_features} repeats a name")
        # Always return them in network order, whatever order the caller gave.
        return tuple(n for n in available if n in out_features)
