"""Our backbones in timm's model registry, for code that asks timm for a backbone by name.

segmentation_models_pytorch (``"tu-<name>"`` encoders), Hugging Face transformers' timm-backbone path
(DETR, Mask2Former, ...) and effdet build their encoders with ``timm.create_model(name,
features_only=True, out_indices=...)``. :func:`register_timm_models` (called once when ``backbone``
is imported; idempotent) registers every name of :data:`backbone.BACKBONES` as ``resnetdet_<name>``:

    >>> import backbone, timm
    >>> m = timm.create_model("resnetdet_resnet101", features_only=True, out_indices=(1, 2, 3, 4))
    >>> m.feature_info.channels(), m.feature_info.reduction()
    ([256, 512, 1024, 2048], [4, 8, 16, 32])

Feature indices follow timm's ResNets: index 0 is the stem convolution's output (stride 2, before
the max pooling), 1..4 are ``res2..res5`` (strides 4..32), so ``out_indices=(1, 2, 3, 4)`` gives
exactly our backbone's ``res2..res5`` outputs. VGG-16 gives ``conv1..conv5, pool5`` (strides 1..32)
and the CIFAR nets ``stem, res2, res3, res4`` (strides 1, 1, 2, 4).

``features_only=True`` without ``out_indices`` gives every level (timm's default ``(0, 1, 2, 3, 4)``;
the CIFAR nets declare their ``(0, 1, 2, 3)``; VGG-16 ``conv1..conv5``, as timm's own VGG), through
``forward_intermediates`` (timm's ``feature_cls="getter"``; ``"fx"`` and ``"hook"`` work too).

Without ``features_only`` the model is our Keras-style classifier (:class:`TimmClassifier`, global
average pooling + ``num_classes``-way fc) with timm's classifier API (``forward_features``,
``forward_head``, ``reset_classifier``, ``get_classifier``, ``forward_intermediates``,
``prune_intermediate_layers``, ``num_features``, ``head_hidden_size``) and a ``pretrained_cfg`` true to
its forward: ``input_size`` 224 (CIFAR nets 32, CIFAR-10's 10 classes and statistics), ``pool_size``
the side of the ``forward_features`` map there (7; CIFAR 8), ``min_input_size`` 32. timm's own
``tests/test_models.py`` passes on all 25 models, except the cases that download weights.

Weights load through timm's own route: ``pretrained=True`` downloads torchvision's ImageNet file where
one exists (on an online machine), and
``pretrained_cfg_overlay=dict(file=path)`` loads a local file in any layout our
:func:`backbone.weights.to_classifier_layout` reads (torchvision, timm, ours, ``.safetensors``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F

from .applications import MIN_SIZE, ImageClassifier
from .base import Backbone, resolved_annotations
from .layers import get_norm
from .registry import BACKBONES, build_backbone
from .resnet import CifarResNet, ResNet
from .vgg import VGG, VGG_FC_HIDDEN, VGG_OUTPUTS, VGGFCHead
from .weights import WeightsError, read_state_dict, to_classifier_layout

__all__ = ["PREFIX", "TimmClassifier", "register_timm_models", "timm_name"]

PREFIX = "resnetdet_"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CIFAR-10's per-channel training-set statistics: the CIFAR nets are the paper's CIFAR-10 models (section 4.2).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# timm reads `default_cfgs` from the module of each registered entrypoint (this one).
default_cfgs: dict[str, Any] = {}


def timm_name(name: str) -> str:
    """The timm model name of our backbone `name` (``"resnet50"`` -> ``"resnetdet_resnet50"``)."""
    return PREFIX + name


def _taps(body: Backbone) -> list[tuple[str, int, int]]:
    """(module name, channels, stride) of every feature timm can take, high to low resolution."""
    shapes = body._out_feature_shapes
    if isinstance(body, ResNet):
        stem = shapes["stem"]
        taps = [("body.stem.conv", stem.channels, stem.stride // 2)]
        return taps + [(f"body.{n}", shapes[n].channels, shapes[n].stride) for n in body.stage_names]
    if isinstance(body, CifarResNet):
        names = ["stem", *body.stage_names]
        return [(f"body.{n}", shapes[n].channels, shapes[n].stride) for n in names]
    if isinstance(body, VGG):
        return [(f"body.{'pool5' if n == 'pool5' else 'block' + n[-1]}", s.channels, s.stride)
                for n, s in shapes.items()]
    raise TypeError(f"{type(body).__name__} has no timm feature layout")


def _all_outputs(name: str) -> tuple[str, ...]:
    """Every output of backbone `name`, so the whole net is built (stages after the last requested
    output are not)."""
    cls = getattr(BACKBONES[name], "func", BACKBONES[name])
    if isinstance(cls, type) and issubclass(cls, VGG):
        return VGG_OUTPUTS
    if isinstance(cls, type) and issubclass(cls, CifarResNet):
        return ("stem", "res2", "res3", "res4")
    return ("stem", "res2", "res3", "res4", "res5")


class TimmClassifier(ImageClassifier):
    """Our classifier with timm's model API (see the module docstring).

    timm's contract, as its own models keep it: ``forward_features`` gives the unpooled
    ``(N, num_features, H/s, W/s)`` map (after the final BN + ReLU of v2 nets; ``s`` = 32, 4 for the
    CIFAR nets); ``forward_head(x, pre_logits=True)`` and the ``num_classes=0`` model give the pooled
    ``(N, head_hidden_size)`` vector: ``num_features`` for the ResNets, fc7's 4096 for VGG-16, whose
    fc6/fc7 (on torchvision's adaptive 7x7 pooling) are its pre-logits layers, kept by
    ``reset_classifier(0)`` as timm's VGG keeps its pre-logits; ``global_pool=""`` gives the map itself.

    Args:
        name: A name of :data:`backbone.BACKBONES` (``"resnet50"``, ``"plain34"``, ``"vgg16"``, ...).
        num_classes: Classifier outputs; 0 gives pooled features (timm's convention).
        in_chans: Input channels.
        global_pool: ``"avg"`` (default), ``"max"`` or ``""`` (no pooling: the last 4D map) when
            ``num_classes=0``; with a classifier only ``"avg"`` is allowed (the Keras-style top).
        drop_rate: Dropout before the classifier.
        **kwargs: Passed to the backbone (``norm``, ``freeze_at``, ``width``, ``stride_in_1x1`` ...).
    """

    def __init__(self, name: str, *, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0, **kwargs: Any) -> None:
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}")
        if kwargs.get("output_stride", 32) != 32:
            raise ValueError(f"{timm_name(name)}: output_stride={kwargs['output_stride']} is not supported (only 32, "
                             "no dilated stages)")
        kwargs.pop("output_stride", None)
        for unsupported in ("drop_path_rate", "drop_block_rate"):
            if kwargs.pop(unsupported, 0.0):
                raise ValueError(f"{timm_name(name)}: {unsupported} (stochastic depth / DropBlock) is not part of "
                                 f"our backbones; pass {unsupported}=0 (effdet: config.backbone_args = {{}})")
        _check_pool(num_classes, global_pool)
        body = build_backbone(name, out_features=_all_outputs(name), in_channels=in_chans, **kwargs)
        last = body.out_features[-1]
        channels = body.output_shape()[last].channels
        head_norm = get_norm(kwargs.get("norm", "BN"), channels) if getattr(body, "preact", False) else None
        fc_head = VGGFCHead(channels) if isinstance(body, VGG) and global_pool else None
        super().__init__(body, include_top=num_classes > 0, pooling=global_pool or None, classes=max(num_classes, 1),
                         input_shape=(in_chans, None, None), head_norm=head_norm, fc_head=fc_head)
        self.fc_head = fc_head  # VGG's pre-logits: kept without a classifier too (the Keras top drops it)
        self.arch = name
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = channels
        self.head_hidden_size = VGG_FC_HIDDEN if isinstance(body, VGG) else channels
        self.feature_info = [{"num_chs": c, "reduction": r, "module": m} for m, c, r in _taps(body)]
        self._last_index = len(self.feature_info) - 1
        self._built_index = self._last_index  # the deepest feature left after pruning

    # -- timm's classifier API -------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.fc if self.fc is not None else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new ``num_classes``-way classifier (0: none, pooled features; with ``global_pool=""`` the map).

        The trunk is kept, and so are VGG's fc6/fc7 (the pre-logits layers; unused without pooling, they
        serve again after a reset with pooling; freshly initialised if they were pruned).
        """
        pool = self.global_pool if global_pool is None else global_pool
        _check_pool(num_classes, pool)
        self._require_full_trunk("reset_classifier")
        self.num_classes, self.global_pool = num_classes, pool
        self.include_top, self.pooling = num_classes > 0, pool or None
        if isinstance(self.body, VGG) and pool and self.fc_head is None:
            self.fc_head = VGGFCHead(self.num_features)
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else None
        if self.fc is not None:
            nn.init.normal_(self.fc.weight, 0, 0.01)
            nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` images -> the unpooled ``(N, num_features, H/s, W/s)`` map."""
        self._require_full_trunk("forward_features")
        x = self.body(self._check_input(x))[self.feature_name]  # (ImageClassifier's; TorchScript has no super())
        return F.relu(self.head_norm(x)) if self.head_norm is not None else x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooling (+ VGG's fc6/fc7), dropout and the classifier on a ``forward_features`` map.

        Returns: ``(N, num_classes)`` logits; ``(N, head_hidden_size)`` with ``pre_logits`` or without a
        classifier; the ``(N, num_features, h, w)`` map itself when ``global_pool=""``.
        """
        if self.global_pool == "":
            return x
        size = 7 if self.fc_head is not None else 1  # VGG: torchvision's adaptive 7x7 pooling, then fc6/fc7
        x = F.adaptive_avg_pool2d(x, size) if self.global_pool == "avg" else F.adaptive_max_pool2d(x, size)
        x = self.fc_head(x) if self.fc_head is not None else x.flatten(1)
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        if pre_logits or self.fc is None:
            return x
        return self.fc(x)

    @resolved_annotations
    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def _require_full_trunk(self, what: str) -> None:
        if self._built_index != self._last_index:
            raise ValueError(f"{what}: this model was pruned to feature index {self._built_index} by "
                             "prune_intermediate_layers (features only); create a new one for the full network")

    def _intermediates(self, x: Tensor, upto: int) -> list[Tensor]:
        """The feature maps of ``feature_info[0..upto]``, running only the layers they need."""
        body = self.body
        if isinstance(body, ResNet | CifarResNet):
            if isinstance(body, ResNet):  # index 0 is the stem convolution, before the max pooling
                x = body.stem.conv(x)
                feats = [x]
                x = body.stem.pool(x)
            else:
                x = body.stem(x)
                feats = [x]
            for name in body.stage_names[:upto]:
                x = getattr(body, name)(x)
                feats.append(x)
            return feats
        feats = []
        for name in body.block_names[: upto + 1]:
            x = getattr(body, name)(x)
            feats.append(x)
        if upto == len(body.block_names):  # pool5, VGG's last feature
            feats.append(body.pool5(x))
        return feats

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's intermediate-feature API: the maps of ``feature_info`` at ``indices``.

        Args:
            x: ``(N, C, H, W)`` images.
            indices: Feature indices (negative from the end), an int n (the last n), None (all).
            norm: Apply the final BN + ReLU of pre-activation nets to the last feature (if taken).
            stop_early: Run only up to the deepest feature taken; the returned final map is then that
                feature (the final norm only applies when it is the last one).
            output_fmt: Only ``"NCHW"``.
            intermediates_only: Return the list only (else ``(final map, list)``; the final map, without
                ``stop_early``, is ``forward_features(x)``).

        Returns:
            ``[(N, C_i, H/r_i, W/r_i)]`` in ``indices`` order, or ``(final, that list)``.
        """
        from timm.models._features import feature_take_indices

        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        x = self._check_input(x)
        last = len(self.feature_info) - 1
        take, max_index = feature_take_indices(last + 1, indices)
        if max_index > self._built_index:
            raise ValueError(f"feature index {max_index} was pruned (prune_intermediate_layers kept 0.."
                             f"{self._built_index}); create a new model for deeper features")
        upto = max_index if stop_early or intermediates_only else self._built_index
        feats = self._intermediates(x, upto)
        picked = [F.relu(self.head_norm(feats[i])) if norm and i == last and self.head_norm is not None else feats[i]
                  for i in take]
        if intermediates_only:
            return picked
        final = feats[-1]
        if self.head_norm is not None and upto == last:
            final = F.relu(self.head_norm(final))
        return final, picked

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drops what the features at ``indices`` do not need, as timm's models do: the stages after the
        deepest one, with ``prune_head`` the classifier and VGG's fc6/fc7 (pooling off), with
        ``prune_norm`` the final norm of v2 nets. Returns the resolved (non-negative) indices."""
        from timm.models._features import feature_take_indices

        take, max_index = feature_take_indices(len(self.feature_info), indices)
        if max_index > self._built_index:
            raise ValueError(f"feature index {max_index} was pruned already (kept 0..{self._built_index})")
        body = self.body
        if isinstance(body, VGG):
            body.truncate(VGG_OUTPUTS[max_index])
        else:
            while len(body.stage_names) > max_index:
                body.split_last_stage()  # the split-off stage is dropped
        self.feature_name = body.out_features[-1]
        self._built_index = max_index
        if prune_head:
            self.num_classes, self.global_pool, self.include_top, self.pooling = 0, "", False, None
            self.fc = self.fc_head = None
        if prune_norm:
            self.head_norm = None
        return take


def _check_pool(num_classes: int, global_pool: str) -> None:
    if global_pool not in ("avg", "max", ""):
        raise ValueError(f"global_pool={global_pool!r}; use 'avg', 'max' or '' (no pooling)")
    if num_classes > 0 and global_pool != "avg":
        raise ValueError(f"global_pool={global_pool!r} with num_classes={num_classes}: the classifier top "
                         "uses average pooling; pass num_classes=0 for other poolings")


def _imagenet_url(name: str) -> str:
    """torchvision's ImageNet (V1) file for `name`, from torchvision's own weight enum; "" if none."""
    from .weights import TORCHVISION_IMAGENET, torchvision_weights_entry

    if name not in TORCHVISION_IMAGENET:
        return ""
    try:
        return str(torchvision_weights_entry(TORCHVISION_IMAGENET[name], "IMAGENET1K_V1").url)
    except ValueError:  # an older torchvision without this entry: no URL, local files still load
        return ""


def _pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's config of `name`, true to what the model computes: ``pool_size`` is the side of the
    ``forward_features`` map at ``input_size`` (stride 32; 4 for the CIFAR nets at their 32 px),
    ``min_input_size`` the smallest side the classifier accepts."""
    cifar = name.startswith("cifar")
    size, stride = (32, 4) if cifar else (224, 32)
    first_conv = "body.block1.0" if name.startswith("vgg") else "body.stem" if cifar else "body.stem.conv"
    url = _imagenet_url(name)
    return {
        "url": url, "num_classes": 10 if cifar else 1000, "input_size": (3, size, size),
        "pool_size": (size // stride, size // stride), "min_input_size": (3, MIN_SIZE, MIN_SIZE),
        "crop_pct": 1.0 if cifar else 0.875, "interpolation": "bilinear",
        "mean": CIFAR10_MEAN if cifar else IMAGENET_MEAN, "std": CIFAR10_STD if cifar else IMAGENET_STD,
        "first_conv": first_conv, "classifier": "fc", "license": "bsd-3-clause" if url else "apache-2.0",
    }


def _default_out_indices(name: str) -> tuple[int, ...]:
    """``features_only``'s default ``out_indices``: every level (the CIFAR nets have 4, VGG-16's default is
    ``conv1..conv5`` as timm's own VGG, the ResNets ``stem.conv, res2..res5`` as timm's ResNets)."""
    return (0, 1, 2, 3) if name.startswith("cifar") else (0, 1, 2, 3, 4)


def _filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """timm's ``pretrained_filter_fn``: any layout we read -> this model's keys, trunk checked strictly."""
    sd, fmt = to_classifier_layout(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k.startswith("body.") and k not in sd and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"the weights ({fmt} layout) lack {len(missing)} trunk entries of "
                           f"{type(model).__name__}({getattr(model, 'arch', '?')}), e.g. {missing[:4]}")
    return {k: v for k, v in sd.items() if k in own}


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    variant = timm_name(name)

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        from timm.models._builder import build_model_with_cfg

        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        if pretrained and overlay.get("file") and not overlay.get("state_dict"):
            # timm's route, read by our weights-only reader: a damaged or crafted file is a one-line
            # WeightsError naming it (timm's own reader raises torch's multi-line message without the path).
            sd = read_state_dict(overlay["file"])
            kwargs["pretrained_cfg_overlay"] = {**{k: v for k, v in overlay.items() if k != "file"}, "state_dict": sd}
        feature_cfg = {"feature_cls": "getter", "out_indices": _default_out_indices(name),
                       **(kwargs.pop("feature_cfg", None) or {})}
        return build_model_with_cfg(
            TimmClassifier, variant, pretrained, name=name, pretrained_filter_fn=_filter_fn,
            feature_cfg=feature_cfg, **kwargs,
        )

    create.__name__ = create.__qualname__ = variant
    create.__module__ = __name__
    create.__doc__ = f"timm entrypoint of our `{name}` backbone (see backbone.timm_plugin)."
    return create


def register_timm_models() -> list[str]:
    """Registers ``resnetdet_<name>`` for every name of :data:`backbone.BACKBONES` (idempotent).

    Returns:
        The registered timm names.
    """
    try:
        from timm.models import is_model, model_entrypoint, register_model
    except ImportError:  # pragma: no cover - timm is a dependency; keep `import backbone` working anyway
        return []
    module = sys.modules[__name__]
    names = []
    for name in BACKBONES:
        variant = timm_name(name)
        names.append(variant)
        if is_model(variant) and getattr(model_entrypoint(variant), "__module__", None) == __name__:
            continue
        default_cfgs[variant] = _pretrained_cfg(name)
        setattr(module, variant, register_model(_entrypoint(name)))
    return names
