"""The shipped YAML configs: where they are, their names, and a config argument resolved to a file.

The repository's top-level ``configs/`` folder is installed as ``resnet_det/configs`` (package data,
see ``setup.py``), so a config is addressable by its name wherever the package runs:
``shapes/faster_rcnn_R_50_FPN`` is ``<configs>/shapes/faster_rcnn_R_50_FPN.yaml``. In a source checkout
or an editable install (``pip install -e .``) the same names read the checkout's ``configs/``.

Example::

    resolve_config("shapes/faster_rcnn_R_50_FPN")       # .../configs/shapes/faster_rcnn_R_50_FPN.yaml
    resolve_config("my_run/config.yaml")                  # a file: used as it is
    shipped_configs()["coco/faster_rcnn_R_50_FPN_1x"]     # its path

This module reads files only; it imports nothing of the project (the config loader is
``resnet_det.config.load_config``, which takes the path returned here).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path, PurePosixPath

__all__ = ["ConfigNotFoundError", "config_description", "configs_root", "resolve_config", "shipped_configs"]

_PACKAGE_DIR = Path(__file__).resolve().parent
SUFFIXES = (".yaml", ".yml")


class ConfigNotFoundError(FileNotFoundError):
    """A config argument that is neither an existing file nor the name of a shipped config."""


def configs_root() -> Path:
    """The folder of the shipped configs.

    Returns:
        ``resnet_det/configs`` inside an installed package (wheel), else the ``configs/`` folder of the
        source checkout this package is imported from (editable install or the repository itself).

    Raises:
        FileNotFoundError: Neither exists (a broken install); the message says how to reinstall.
    """
    installed = _PACKAGE_DIR / "configs"
    if installed.is_dir():
        return installed
    checkout = _PACKAGE_DIR.parent / "configs"
    if checkout.is_dir() and (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return checkout
    raise FileNotFoundError(
        f"the shipped configs are missing: neither {installed} nor a source checkout's configs/ exists; "
        "reinstall the package (pip install resnet-det, or pip install -e . in the repository)"
    )


def shipped_configs() -> dict[str, Path]:
    """Every shipped config by name (its path under :func:`configs_root` without the suffix), sorted."""
    root = configs_root()
    found = (p for suffix in SUFFIXES for p in root.rglob(f"*{suffix}") if p.is_file())
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(found)}


def config_description(path: str | os.PathLike[str]) -> str:
    """The first comment line of a YAML file, without its ``#`` (empty if the file starts otherwise).

    Args:
        path: A YAML file.

    Returns:
        The description, e.g. ``"Faster R-CNN R101-FPN, 1x. Reference: ..."``.
    """
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text:
                continue
            return text.lstrip("#").strip() if text.startswith("#") else ""
    return ""


def _name_of(ref: str) -> str:
    """``configs/shapes/x.yaml`` / ``shapes/x.yaml`` / ``shapes\\x`` -> ``shapes/x``."""
    name = ref.replace("\\", "/").strip("/")
    if name.startswith("./"):
        name = name[2:]
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _close_matches(name: str, names: list[str], n: int = 3) -> list[str]:
    """The closest names, comparing whole names and, for a name given without its folder, file stems."""
    by_name = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    stems = {PurePosixPath(c).name: c for c in names}
    by_stem = [stems[s] for s in difflib.get_close_matches(PurePosixPath(name).name, list(stems), n=n, cutoff=0.6)]
    return list(dict.fromkeys(by_name + by_stem))[:n]


def resolve_config(ref: str | os.PathLike[str]) -> Path:
    """The file a config argument means: an existing file, else the shipped config of that name.

    A path wins when a file and a shipped name are both possible. A name may carry the ``.yaml``
    suffix and a leading ``configs/`` (so the repository-relative paths of the README work from any
    folder).

    Args:
        ref: A path to a YAML file, or a shipped config's name such as ``shapes/faster_rcnn_R_50_FPN``.

    Returns:
        The path of the file.

    Raises:
        ConfigNotFoundError: Neither a file nor a shipped name; the one-line message lists close
            matches and names ``resnet-det configs``, which lists them all.
    """
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    configs = shipped_configs()
    name = _name_of(os.fspath(ref))
    if name in configs:
        return configs[name]
    matches = _close_matches(name, list(configs))
    hint = f"; did you mean {', '.join(matches)}?" if matches else ""
    raise ConfigNotFoundError(
        f"config {os.fspath(ref)!r} is neither a file nor a shipped config name{hint} "
        "(`resnet-det configs` lists the shipped configs)"
    )
