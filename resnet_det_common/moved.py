"""Import aliases for modules that moved, kept for one release.

`alias_module("detection.engine", "resnet_det.engine")` (called by the old module itself) makes the old name
and every old submodule name (`detection.engine.trainer`, ...) the *same module objects* as the new ones
(classes keep their identity: `isinstance` and pickles work across both spellings), and warns once per old
name with a `DeprecationWarning` that gives the new import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "alias_module"]

#: old name -> new name of every alias installed in this process.
MOVED: dict[str, str] = {}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the target module is already executed


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        for old, new in MOVED.items():
            if fullname.startswith(old + "."):
                _warn(old, new, fullname)
                return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new + fullname[len(old):]))
        return None


_FINDER = _AliasFinder()


def _warn(old: str, new: str, name: str) -> None:
    warnings.warn(f"{name} moved to {new + name[len(old):]} (the old name is an alias for one release): "
                  f"import {new + name[len(old):]}", DeprecationWarning, stacklevel=4)


def alias_module(old: str, new: str) -> ModuleType:
    """Make module `old` (the caller, being imported) and its submodules aliases of `new`; returns `new`."""
    MOVED[old] = new
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    _warn(old, new, old)
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module
