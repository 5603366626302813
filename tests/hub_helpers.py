"""A torchvision weight file in a temporary torch hub cache, named the way torchvision names its files."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch


def hub_file_named_by_its_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry, state_dict: dict) -> Path:
    """Saves `state_dict` in a temporary TORCH_HOME's hub/checkpoints as `<name>-<first 8 hex digits of its
    SHA-256>.pth`. Random weights cannot have the published digest, so the weight enum's URL (`entry`, a
    torchvision weight enum member) is pointed, for this test only, at the name carrying this file's digest.

    Returns:
        The cached file.
    """
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    folder.mkdir(parents=True)
    tmp = folder / "incoming.pth"
    torch.save(state_dict, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    url = re.sub(r"-[0-9a-f]+\.pth$", f"-{digest[:8]}.pth", entry.url)
    assert url != entry.url
    monkeypatch.setattr(entry.value, "url", url)
    return tmp.rename(folder / url.rsplit("/", 1)[1])
