"""Weight import and export: torchvision / timm ImageNet checkpoints, our own safetensors files.

Every foreign state dict is first converted to the key layout of our `ImageClassifier`
(`body.<trunk keys>`, plus the head: `fc.*`, `head_norm.*` (v2), `fc_head.fc6/fc7.*` (VGG)). Loading
into a bare backbone strips `body.` and sets the head keys aside. Loading is strict by default: any
missing, unexpected or mis-shaped key raises a `ValueError` carrying the full report.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from resnet_det.common import atomic_write

log = logging.getLogger(__name__)

HEAD_PREFIXES = ("fc.", "head_norm.", "fc_head.")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class WeightsError(ValueError):
    """A weights file that cannot be read, recognised or matched to the model."""


@dataclass
class LoadReport:
    """What a load did: keys the model lacked in the file, keys the file had in excess, shape clashes."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    source_format: str = ""

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        def fmt(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")

        parts = [f"format={self.source_format}"]
        for name in ("missing", "unexpected", "mismatched", "ignored"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{len(keys)} {name}: {fmt(keys)}")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------- reading
def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a `.pth`/`.pt`/`.bin` (with `weights_only=True`) or `.safetensors` file into a flat state dict.

    Common wrappers are unwrapped (`{"state_dict": ...}`, `{"model": ...}`) and a DDP `module.` prefix
    is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(f"weights file {str(path)!r} has suffix {path.suffix!r}; expected one of {WEIGHT_SUFFIXES}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with objects, ...
        raise WeightsError(f"could not read weights file {str(path)!r}: {type(e).__name__}: {e}") from e
    for key in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsError(f"{str(path)!r} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def detect_format(sd: dict[str, Tensor]) -> str:
    """Name the layout of a state dict: torchvision_resnet (also timm's resnet), timm_resnetv2,
    torchvision_vgg, ours_classifier, ours_backbone."""
    keys = set(sd)
    if any(k.startswith("body.") for k in keys):
        return "ours_classifier"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision_resnet"
    if "stem.conv.weight" in keys and any(k.startswith("stages.") for k in keys):
        return "timm_resnetv2"
    if "features.0.weight" in keys:
        return "torchvision_vgg"
    if "stem.conv.weight" in keys or "block1.0.weight" in keys:
        return "ours_backbone"
    sample = ", ".join(sorted(keys)[:5])
    raise WeightsError(f"unrecognised state dict layout (first keys: {sample}); supported: torchvision/timm "
                       "ResNet, timm ResNetV2, torchvision VGG, and this project's own files")


# -------------------------------------------------------------------------------------- converters
_TV_LAYER = re.compile(r"^layer(\d)\.(\d+)\.(.*)$")


def convert_torchvision_resnet(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision (or timm `resnet*`) ResNet keys -> our classifier keys."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("conv1."):
            nk = "body.stem.conv." + k[len("conv1."):]
        elif k.startswith("bn1."):
            nk = "body.stem.conv.norm." + k[len("bn1."):]
        elif k.startswith("fc."):
            nk = k
        elif m := _TV_LAYER.match(k):
            stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
            rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
            rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
            nk = f"body.res{stage}.{block}.{rest}"
        else:
            nk = "unknown." + k
        out[nk] = v
    return out


def convert_timm_resnetv2(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm `resnetv2_*` (pre-activation, plain conv) keys -> our classifier keys."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("stem.conv."):
            nk = "body." + k
        elif k.startswith("norm."):
            nk = "head_norm." + k[len("norm."):]
        elif k.startswith("head.fc."):
            nk = "fc." + k[len("head.fc."):]
            if v.dim() == 4:  # timm's 1x1-conv classifier -> Linear
                v = v.flatten(1)
        elif m := re.match(r"^stages\.(\d)\.blocks\.(\d+)\.(.*)$", k):
            rest = m.group(3).replace("downsample.conv.", "shortcut.")
            nk = f"body.res{int(m.group(1)) + 2}.{m.group(2)}.{rest}"
        else:
            nk = "unknown." + k
        out[nk] = v
    return out


def _vgg_feature_index_map(bn: bool) -> dict[int, tuple[str, bool]]:
    """torchvision `features.<i>` index -> (our conv prefix, is_norm)."""
    from .vgg import VGG16_BLOCKS

    mapping: dict[int, tuple[str, bool]] = {}
    idx = 0
    for b, (n_convs, _) in enumerate(VGG16_BLOCKS, start=1):
        pos = 0 if b == 1 else 1  # blocks 2..5 start with their max pool
        for _ in range(n_convs):
            mapping[idx] = (f"body.block{b}.{pos}", False)
            if bn:
                mapping[idx + 1] = (f"body.block{b}.{pos}.norm", True)
            idx += 3 if bn else 2
            pos += 1
        idx += 1  # the max pool after the block
    return mapping


def convert_torchvision_vgg(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision `vgg16` / `vgg16_bn` keys -> our classifier keys (fc6/fc7 -> `fc_head`, fc8 -> `fc`)."""
    bn = any(k.endswith("running_mean") for k in sd)
    fmap = _vgg_feature_index_map(bn)
    heads = {"classifier.0.": "fc_head.fc6.", "classifier.3.": "fc_head.fc7.", "classifier.6.": "fc."}
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        nk = "unknown." + k
        if m := re.match(r"^features\.(\d+)\.(.*)$", k):
            i = int(m.group(1))
            if i in fmap:
                nk = f"{fmap[i][0]}.{m.group(2)}"
        else:
            for src, dst in heads.items():
                if k.startswith(src):
                    nk = dst + k[len(src):]
        out[nk] = v
    return out


def to_classifier_layout(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """Convert any supported state dict to our classifier key layout. Returns `(state_dict, format)`."""
    fmt = detect_format(sd)
    if fmt == "torchvision_resnet":
        return convert_torchvision_resnet(sd), fmt
    if fmt == "timm_resnetv2":
        return convert_timm_resnetv2(sd), fmt
    if fmt == "torchvision_vgg":
        return convert_torchvision_vgg(sd), fmt
    if fmt == "ours_backbone":
        return {"body." + k: v for k, v in sd.items()}, fmt
    return dict(sd), fmt


# ----------------------------------------------------------------------------------------- loading
def _optional_key(key: str) -> bool:
    # FrozenBN has no num_batches_tracked; BN's counter is not a weight.
    return key.endswith("num_batches_tracked")


def load_weights(model: nn.Module, source: str | os.PathLike | dict[str, Tensor], *, strict: bool = True) -> LoadReport:
    """Load torchvision / timm / our weights into an `ImageClassifier` or a bare `Backbone`.

    Args:
        model: our classifier (keys `body.*` + head) or backbone (trunk keys only).
        source: a file path (`.pth`, `.pt`, `.bin`, `.safetensors`) or a state dict.
        strict: raise `WeightsError` with the report when a key is missing, unexpected or mis-shaped.
            Head keys are set aside (`report.ignored`) when the model has no head; stages a backbone
            did not build (e.g. res5 of a C4 trunk) count as ignored too.

    Returns:
        The `LoadReport`.
    """
    sd = read_state_dict(source) if not isinstance(source, dict) else dict(source)
    sd, fmt = to_classifier_layout(sd)
    target = model.state_dict()
    is_classifier = any(k.startswith("body.") for k in target)
    report = LoadReport(source_format=fmt)
    if not is_classifier:
        stripped = {}
        for k, v in sd.items():
            if k.startswith("body."):
                stripped[k[len("body."):]] = v
            else:
                report.ignored.append(k)
        sd = stripped
        built = {k.split(".")[0] for k in target}
        for k in list(sd):
            if k.split(".")[0] not in built:
                report.ignored.append(k)
                sd.pop(k)
    elif not any(k.startswith(HEAD_PREFIXES) for k in target):
        for k in list(sd):
            if k.startswith(HEAD_PREFIXES):
                report.ignored.append(k)
                sd.pop(k)
    to_load: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k not in target:
            if not _optional_key(k):
                report.unexpected.append(k)
            continue
        if tuple(target[k].shape) != tuple(v.shape):
            report.mismatched.append(f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}")
            continue
        to_load[k] = v
    report.missing = [k for k in target if k not in sd and not _optional_key(k)]
    if strict and not report.ok:
        raise WeightsError(f"weights do not match {type(model).__name__}: {report}")
    model.load_state_dict(to_load, strict=False)
    return report


# ----------------------------------------------------------------------------------------- our own
def save_safetensors(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Export a module's weights (and buffers) to a `.safetensors` file (shared tensors are copied)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path {str(path)!r} must end with .safetensors")
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata or {}))


# ---------------------------------------------------------------------------------------- ImageNet
# Arch -> (provider, file name, URL or hub repo). torchvision's V1 weights are the ones its detection
# models start from; the V2 file is accepted too when it is the one in the cache.
IMAGENET_WEIGHTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "resnet18": ("torchvision", ("resnet18-f37072fd.pth",), "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
    "resnet34": ("torchvision", ("resnet34-b627a593.pth",), "https://download.pytorch.org/models/resnet34-b627a593.pth"),
    "resnet50": ("torchvision", ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
                 "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    "resnet101": ("torchvision", ("resnet101-63fe2227.pth", "resnet101-cd907fc2.pth"),
                  "https://download.pytorch.org/models/resnet101-63fe2227.pth"),
    "resnet152": ("torchvision", ("resnet152-394f9c45.pth", "resnet152-f82ba261.pth"),
                  "https://download.pytorch.org/models/resnet152-394f9c45.pth"),
    "vgg16": ("torchvision", ("vgg16-397923af.pth",), "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "vgg16_bn": ("torchvision", ("vgg16_bn-6c64b313.pth",), "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth"),
    "resnet50v2": ("timm", ("model.safetensors",), "timm/resnetv2_50.a1h_in1k"),
    "resnet101v2": ("timm", ("model.safetensors",), "timm/resnetv2_101.a1h_in1k"),
}


def offline() -> bool:
    """True when downloads are disabled (`RESNET_DET_OFFLINE=1` or `HF_HUB_OFFLINE=1`)."""
    return any(os.environ.get(v, "0") not in ("", "0") for v in ("RESNET_DET_OFFLINE", "HF_HUB_OFFLINE"))


def torch_hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dir() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def resolve_imagenet_weights(arch: str) -> Path:
    """Path to the ImageNet checkpoint of `arch` in the torchvision / Hugging Face (timm) cache.

    When the file is not there it is downloaded, unless downloads are disabled or fail: then a
    `WeightsError` names the file to place and the folder to place it in.
    """
    if arch not in IMAGENET_WEIGHTS:
        raise WeightsError(f"no ImageNet weights are known for {arch!r}; available for {sorted(IMAGENET_WEIGHTS)}. "
                           "Pass weights=<path to a .pth/.safetensors file> instead")
    provider, names, where = IMAGENET_WEIGHTS[arch]
    if provider == "torchvision":
        folder = torch_hub_checkpoint_dir()
        for name in names:
            if (folder / name).is_file():
                return folder / name
        target = folder / names[0]
        how = f"download {where} and place it at {target}"
        if not offline():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(where, str(target), progress=True)
                return target
            except Exception as e:
                raise WeightsError(f"ImageNet weights for {arch} are not in the cache and the download failed "
                                   f"({type(e).__name__}: {e}); {how}") from e
        raise WeightsError(f"ImageNet weights for {arch} not found: expected file {names[0]} in folder {folder} "
                           f"(downloads are disabled); {how}")
    repo_dir = hf_hub_cache_dir() / ("models--" + where.replace("/", "--"))
    found = sorted(repo_dir.glob("snapshots/*/model.safetensors"))
    if found:
        return found[-1]
    how = (f"download model.safetensors of the Hugging Face repo {where} (timm) into {repo_dir}/snapshots/<rev>/, "
           "e.g. with huggingface_hub.hf_hub_download, or pass weights=<path>")
    if not offline():
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(where, "model.safetensors"))
        except Exception as e:
            raise WeightsError(f"ImageNet weights for {arch} are not in the cache and the download failed "
                               f"({type(e).__name__}: {e}); {how}") from e
    raise WeightsError(f"ImageNet weights for {arch} not found: expected file model.safetensors under {repo_dir} "
                       f"(downloads are disabled); {how}")
