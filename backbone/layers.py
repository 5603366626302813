"""Building blocks shared by every backbone: norms, a convolution that carries its norm, BN folding."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

NormSpec = str | Callable[[int], nn.Module] | None

NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "none")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, no parameters).

    The state dict has the same keys as `nn.BatchNorm2d` (a `num_batches_tracked` entry in a loaded
    state dict is accepted and dropped), so ImageNet checkpoints load directly. Under autocast the
    scale and shift are computed in fp32 and applied in the input's dtype.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def scale_and_shift(self) -> tuple[Tensor, Tensor]:
        """Per-channel `(scale, shift)` in fp32 such that `y = x * scale + shift`."""
        scale = self.weight.float() * torch.rsqrt(self.running_var.float() + self.eps)
        shift = self.bias.float() - self.running_mean.float() * scale
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Return `module` with every `BatchNorm2d`/`SyncBatchNorm` inside replaced by a frozen copy."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            frozen = cls(module.num_features, module.eps)
            if module.affine:
                frozen.weight.copy_(module.weight.detach())
                frozen.bias.copy_(module.bias.detach())
            if module.track_running_stats and module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
            return frozen
        for name, child in module.named_children():
            new = cls.convert(child)
            if new is not child:
                setattr(module, name, new)
        return module


def _group_count(channels: int, groups: int = 32) -> int:
    # GroupNorm needs channels % groups == 0; narrow test models (width 8) use fewer groups.
    return math.gcd(groups, channels)


def get_norm(norm: NormSpec, channels: int) -> nn.Module:
    """Build a 2-D normalisation layer.

    Args:
        norm: "BN", "SyncBN", "FrozenBN", "GN" (32 groups, fewer when `channels` is not a multiple of
            32), "none"/None (identity), or a callable `channels -> nn.Module`.
        channels: number of channels to normalise.
    """
    if callable(norm) and not isinstance(norm, str):
        return norm(channels)
    if norm is None or norm == "none" or norm == "":
        return nn.Identity()
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(_group_count(channels), channels)
    raise ValueError(f"norm={norm!r} is not supported; use one of {NORMS} or a callable channels -> nn.Module")


def check_norm(norm: NormSpec) -> None:
    """Raise `ValueError` early (at construction) for an unknown norm name."""
    if isinstance(norm, str) and norm not in NORMS and norm != "":
        raise ValueError(f"norm={norm!r} is not supported; use one of {NORMS} or a callable channels -> nn.Module")


_MKLDNN = torch.backends.mkldnn.is_available()  # read once: torch.compile cannot trace the query


# Compute dtypes whose CPU convolutions fuse. bf16 (autocast, AMX): the fused kernels take the separate bf16
# bias/ReLU/add passes away (about 1.6x on R50-FPN inference). fp32: the same arithmetic and speed within 1%,
# but oneDNN then keeps reordered copies of the weights (+0.1 GiB for R50-FPN), so fp32 takes the plain path.
FUSED_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)


def _fusable_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype a fused CPU convolution computes in (autocast's, else the input's), None if not fused."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dtype if dtype in FUSED_DTYPES else None


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that carries its normalisation and activation.

    Keeping the norm inside the convolution module (state-dict key `<conv>.norm.*`) makes folding a
    frozen BN into the convolution a local rewrite, and keeps the keys stable across norm choices.

    With `fused_inference` (set by `enable_fused_inference`, after folding), inference on a CPU under bf16
    autocast (`FUSED_DTYPES`) runs the convolution, its bias, the ReLU and, for residual blocks and FPN
    laterals, the addition that follows as one oneDNN kernel (`torch.ops.mkldnn._convolution_pointwise`),
    without separate passes over the activations (the sum is rounded to bf16 once instead of twice).
    """

    fused_inference = False  # class default (no annotation: TorchScript cannot read string annotations here)

    def __init__(self, *args, norm: nn.Module | None = None, activation: nn.Module | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm if norm is not None else nn.Identity()
        self.activation = activation if activation is not None else nn.Identity()
        self.fused_inference = False  # an instance attribute: TorchScript does not see class attributes

    def can_fuse(self, x: Tensor) -> bool:
        """True when this call can take the fused CPU inference path."""
        # (not under torch.compile: the fused oneDNN ops have no fake-tensor kernels; inductor fuses by itself)
        return (self.fused_inference and x.device.type == "cpu" and x.dim() == 4 and x.numel() > 0
                and not torch.compiler.is_compiling()
                and not torch.is_grad_enabled() and isinstance(self.norm, nn.Identity)
                and isinstance(self.activation, nn.Identity | nn.ReLU) and self.padding_mode == "zeros"
                and not isinstance(self.padding, str) and _fusable_dtype(x) is not None and _MKLDNN)

    def _params_in(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """Weight and bias in `dtype`, the cast cached (autocast would cast them at every call)."""
        if dtype == self.weight.dtype:
            return self.weight, self.bias
        key = (dtype, self.weight.data_ptr(), self.weight._version,
               None if self.bias is None else (self.bias.data_ptr(), self.bias._version))
        cached = self.__dict__.get("_cast_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.weight.detach().to(dtype), None if self.bias is None else self.bias.detach().to(dtype))
            self.__dict__["_cast_cache"] = cached  # a plain attribute: never in the state dict
        return cached[1], cached[2]

    def forward_fused(self, x: Tensor, add: Tensor | None = None, relu: bool | None = None) -> Tensor:
        """`activation(conv(x) + bias)`, or with `add`: `relu?(conv(x) + bias + add)` (`relu` default: the
        module's activation), as one kernel. Call only when `can_fuse(x)`."""
        dtype = _fusable_dtype(x)
        w, b = self._params_in(dtype)
        x = x.to(dtype)
        relu = isinstance(self.activation, nn.ReLU) if relu is None else relu
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(x, w, b, *geometry, "relu" if relu else "none", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(x, add.to(dtype), w, b, *geometry, "add", None,
                                                              "relu" if relu else None, [], "")

    def forward(self, x: Tensor) -> Tensor:
        # Both shortcuts below are eager-only (oneDNN ops, module isinstance checks): TorchScript leaves the
        # `not is_scripting()` block uncompiled and runs the plain path, which computes the same function.
        if not torch.jit.is_scripting():
            if self.fused_inference and self.can_fuse(x):
                return self.forward_fused(x)
            if self.training and isinstance(self.norm, FrozenBatchNorm2d):
                # Frozen BN is an affine map of the conv's output channels: fold it into the (possibly
                # trainable) weights on the fly, conv(x, W * s) + b, instead of two extra passes over the
                # activations (and their backward). In eval mode the separate ops are kept so outputs match
                # torchvision's bit for bit; `fold_frozen_batchnorm` folds permanently for inference.
                scale, shift = self.norm.scale_and_shift()
                weight = self.weight * scale.to(self.weight.dtype).view(-1, 1, 1, 1)
                bias = shift.to(self.weight.dtype) if self.bias is None else self.bias * scale + shift
                x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
                return self.activation(x)
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self.activation(self.norm(x))


@torch.no_grad()
def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Fold every `FrozenBatchNorm2d` that follows a `Conv2d` of ours into that convolution (in place).

    After folding, the convolution has a bias and its norm is an identity: one kernel instead of two at
    inference, same outputs up to float rounding. Pre-activation (v2) blocks, whose norm comes before
    the convolution, are left as they are.

    Returns:
        The number of norms folded.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, Conv2d) and isinstance(m.norm, FrozenBatchNorm2d):
            scale, shift = m.norm.scale_and_shift()
            w = m.weight.float() * scale.view(-1, 1, 1, 1)
            b = shift if m.bias is None else m.bias.float() * scale + shift
            m.weight.copy_(w.to(m.weight.dtype))
            if m.bias is None:
                m.bias = nn.Parameter(b.to(m.weight.dtype), requires_grad=m.weight.requires_grad)
            else:
                m.bias.copy_(b.to(m.bias.dtype))
            m.norm = nn.Identity()
            count += 1
    return count


def enable_fused_inference(module: nn.Module, enabled: bool = True) -> int:
    """Let every `Conv2d` of ours in `module` whose norm is gone (folded, or none) fuse its bias, ReLU and
    residual addition into one oneDNN kernel at CPU inference (see `Conv2d`). Training, autograd and other
    devices keep the plain path. Returns the number of convolutions enabled."""
    count = 0
    for m in module.modules():
        if isinstance(m, Conv2d) and isinstance(m.norm, nn.Identity):
            m.fused_inference = enabled
            m.__dict__.pop("_cast_cache", None)
            count += 1
    return count


def c2_msra_fill(module: nn.Module) -> None:
    """He (MSRA) init for convolutions, as in the ResNet paper."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.SyncBatchNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
