"""Weight import and export: torchvision / timm ImageNet checkpoints, our own safetensors files.

Every foreign state dict is first converted to the key layout of our `ImageClassifier`
(`body.<trunk keys>`, plus the head: `fc.*`, `head_norm.*` (v2), `fc_head.fc6/fc7.*` (VGG)). Loading
into a bare backbone strips `body.` and sets the head keys aside. Loading is strict by default: any
missing, unexpected or mis-shaped key raises a `ValueError` carrying the full report.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from resnet_det_common import atomic_write
from resnet_det_common.io import FileLoadError, load_weights_only

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
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # truncated, a bad header, not a safetensors file at all
            raise WeightsError(f"could not read weights file {str(path)!r}: it is truncated or not a safetensors "
                               f"file ({type(e).__name__}: {_first_line(e)})") from None
    else:
        try:
            sd = load_weights_only(path, what="weights file")
        except FileLoadError as e:  # damaged, or pickled objects (refused, never run)
            raise WeightsError(f"could not read weights file {str(path)!r}: {e.reason}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        found = f"a {type(sd).__name__}" if not isinstance(sd, dict) else "a dict with non-tensor values"
        keys = f" (keys: {', '.join(map(str, list(sd)[:5]))})" if isinstance(sd, dict) else ""
        hint = ("this is a trainer state (<name>.state.pt): pass the checkpoint's .safetensors file"
                if isinstance(sd, dict) and "iteration" in sd and "optimizer" in sd
                else "save model.state_dict() (or a .safetensors file)")
        raise WeightsError(f"weights file {str(path)!r} does not hold a state dict of tensors: it holds {found}{keys}; "
                           f"{hint}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:160]


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


# ------------------------------------------------------------------------------------ cached files
# Our ImageNet arch -> torchvision's model name (its weight enum gives URL, file name and hash), or the
# Hugging Face repo and file of timm's weights. torchvision's V1 weights are the ones its detection models
# start from; a newer IMAGENET1K file (V2) is accepted when it is the one in the cache.
TORCHVISION_IMAGENET: dict[str, str] = {
    "resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50", "resnet101": "resnet101",
    "resnet152": "resnet152", "vgg16": "vgg16", "vgg16_bn": "vgg16_bn",
}
HF_IMAGENET: dict[str, tuple[str, str]] = {
    "resnet50v2": ("timm/resnetv2_50.a1h_in1k", "model.safetensors"),
    "resnet101v2": ("timm/resnetv2_101.a1h_in1k", "model.safetensors"),
}
_IMAGENET_ENTRY = re.compile(r"IMAGENET1K_V\d+")
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def imagenet_weights_table() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """Arch -> (provider, cached file names, URL or hub repo), derived from torchvision's weight enums and
    `HF_IMAGENET` (e.g. for `pretrained_cfg` URLs). Also available as the module attribute `IMAGENET_WEIGHTS`."""
    from torchvision.models import get_model_weights

    table: dict[str, tuple[str, tuple[str, ...], str]] = {}
    for arch, tv_name in TORCHVISION_IMAGENET.items():
        entries = [w for w in get_model_weights(tv_name) if _IMAGENET_ENTRY.fullmatch(w.name)]
        table[arch] = ("torchvision", tuple(os.path.basename(w.url) for w in entries), entries[0].url)
    for arch, (repo, filename) in HF_IMAGENET.items():
        table[arch] = ("timm", (filename,), repo)
    return table


def __getattr__(name: str) -> Any:
    if name == "IMAGENET_WEIGHTS":  # computed on first use: it imports torchvision's model registry
        globals()[name] = imagenet_weights_table()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def offline() -> bool:
    """True when downloads are disabled (`RESNET_DET_OFFLINE=1` or `HF_HUB_OFFLINE=1`)."""
    return any(os.environ.get(v, "0") not in ("", "0") for v in ("RESNET_DET_OFFLINE", "HF_HUB_OFFLINE"))


def torch_hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint folder (`$TORCH_HOME/hub/checkpoints`, `torch.hub.get_dir()/checkpoints`)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (`HF_HUB_CACHE`, `HF_HOME/hub`)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (remembered per path, size and modification time)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key]


def check_hash_prefix(path: str | os.PathLike, url: str = "") -> None:
    """Verify a torch.hub file against the SHA-256 prefix in its name (`resnet50-0676ba61.pth`), as
    `torch.hub`'s `check_hash` does; a name without one is not checked.

    Raises:
        WeightsError: the digest differs (the message names the file and how to replace it).
    """
    path = Path(path)
    m = torch.hub.HASH_REGEX.search(path.name)
    prefix = m.group(1) if m else ""
    if not prefix:
        return
    digest = sha256_of(path)
    if not digest.startswith(prefix):
        again = f"download {url} again into {path.parent}" if url else "replace it with the published file"
        raise WeightsError(f"weights file {path} is damaged or not the published file: its SHA-256 starts with "
                           f"{digest[:len(prefix)]}, its name says {prefix}. Delete it and {again}")


def torchvision_weights_entry(model_name: str, weights: Any) -> Any:
    """torchvision's weight enum member for `model_name` from a name ("DEFAULT", "COCO_V1",
    "FasterRCNN_ResNet50_FPN_Weights.COCO_V1") or the member itself.

    Raises:
        ValueError: an unknown model or weight name (the message lists the valid names).
    """
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(model_name)
    except ValueError as e:
        raise ValueError(f"torchvision has no model {model_name!r} with weights: {e}") from None
    valid = ", ".join(["DEFAULT", *enum.__members__])
    if isinstance(weights, str) and "." in weights and not weights.startswith(enum.__name__ + "."):
        raise ValueError(f"weights={weights!r} are not {model_name}'s ({enum.__name__}); use one of {valid}")
    try:
        return enum.verify(weights)
    except (KeyError, TypeError):
        raise ValueError(f"weights={weights!r} is not a weight of torchvision's {model_name}; use one of {valid}, "
                         "an enum member, or a checkpoint path") from None


def resolve_torchvision_weights(entry: Any) -> Path:
    """The file of a torchvision weight enum member in torch's hub cache, its hash prefix verified.

    When the file is not there it is downloaded (hash checked by torch.hub), unless downloads are disabled
    (`RESNET_DET_OFFLINE=1` / `HF_HUB_OFFLINE=1`) or fail: then a `WeightsError` names the file, the folder
    to put it in and the URL.
    """
    url: str = entry.url
    name = os.path.basename(url)
    folder = torch_hub_checkpoint_dir()
    target = folder / name
    if target.is_file():
        check_hash_prefix(target, url)
        return target
    how = f"download {url} and place it at {target}"
    if offline():
        raise WeightsError(f"{entry} not found: expected file {name} in folder {folder} (downloads are disabled by "
                           f"RESNET_DET_OFFLINE / HF_HUB_OFFLINE); {how}")
    m = torch.hub.HASH_REGEX.search(name)
    try:  # pragma: no cover - needs the network
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=m.group(1) if m else None, progress=True)
    except Exception as e:  # pragma: no cover - needs the network
        raise WeightsError(f"{entry} is not in the cache and the download failed ({type(e).__name__}: {e}); "
                           f"{how}") from e
    return target  # pragma: no cover - needs the network


def resolve_hf_file(repo_id: str, filename: str) -> Path:
    """A file of a Hugging Face model repo from the hub cache (huggingface_hub's cache API), downloaded when
    absent unless downloads are disabled; a blob stored under its SHA-256 (LFS files) is verified.

    The `main` revision is preferred; otherwise the most recently modified cached revision holding the file.

    Raises:
        WeightsError: not cached and not downloadable (the message names the file, the folder and the URL),
            or a blob whose content does not match its name.
    """
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    cache = hf_hub_cache_dir()
    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
    path = Path(found) if isinstance(found, str) else None
    if path is None and cache.is_dir():
        try:
            info = scan_cache_dir(cache)
        except Exception:  # a damaged cache folder: report the file as missing below
            info = None
        revisions = [rev for repo in (info.repos if info else ()) if repo.repo_id == repo_id and
                     repo.repo_type == "model" for rev in repo.revisions
                     if any(f.file_name == filename for f in rev.files)]
        if revisions:
            latest = max(revisions, key=lambda r: r.last_modified)
            path = next(f.file_path for f in latest.files if f.file_name == filename)
    if path is not None:
        _check_hf_blob(path)
        return path
    url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    how = (f"download {url} into the Hugging Face cache {cache} (huggingface_hub.hf_hub_download({repo_id!r}, "
           f"{filename!r}) on a machine online, then copy {folder}), or pass weights=<path>")
    if offline():
        raise WeightsError(f"{filename} of {repo_id} not found in the Hugging Face cache: expected it under folder "
                           f"{folder} (downloads are disabled by RESNET_DET_OFFLINE / HF_HUB_OFFLINE); {how}")
    try:  # pragma: no cover - needs the network
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, cache_dir=cache))
    except Exception as e:  # pragma: no cover - needs the network
        raise WeightsError(f"{filename} of {repo_id} is not in the cache and the download failed "
                           f"({type(e).__name__}: {e}); {how}") from e


def _check_hf_blob(path: Path) -> None:
    blob = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", blob.name) and sha256_of(blob) != blob.name:
        raise WeightsError(f"cached file {path} (blob {blob}) is damaged: its SHA-256 is not its blob name "
                           f"{blob.name}; delete the blob and download it again")


def resolve_imagenet_weights(arch: str) -> Path:
    """Path to the ImageNet checkpoint of `arch` in the torchvision or Hugging Face (timm) cache, verified.

    torchvision files come through torchvision's weight enums (e.g. `ResNet50_Weights.IMAGENET1K_V1`): the
    first IMAGENET1K file in torch's hub cache is used, its SHA-256 prefix checked. timm files come from the
    Hugging Face cache (`huggingface_hub.try_to_load_from_cache`). When no file is cached it is downloaded,
    unless downloads are disabled or fail: then a `WeightsError` names the file, the folder and the URL.
    """
    if arch in TORCHVISION_IMAGENET:
        from torchvision.models import get_model_weights

        entries = [w for w in get_model_weights(TORCHVISION_IMAGENET[arch]) if _IMAGENET_ENTRY.fullmatch(w.name)]
        folder = torch_hub_checkpoint_dir()
        for entry in entries:
            if (folder / os.path.basename(entry.url)).is_file():
                return resolve_torchvision_weights(entry)
        try:
            return resolve_torchvision_weights(entries[0])
        except WeightsError as e:
            raise WeightsError(f"ImageNet weights for {arch}: {e}") from None
    if arch in HF_IMAGENET:
        try:
            return resolve_hf_file(*HF_IMAGENET[arch])
        except WeightsError as e:
            raise WeightsError(f"ImageNet weights for {arch}: {e}") from None
    known = sorted([*TORCHVISION_IMAGENET, *HF_IMAGENET])
    raise WeightsError(f"no ImageNet weights are known for {arch!r}; available for {known}. "
                       "Pass weights=<path to a .pth/.safetensors file> instead")
