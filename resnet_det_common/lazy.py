"""Lazy package exports (PEP 562): a package's public names are imported on first use, not with the package.

Why: ``resnet-det eval --results R --annotations A`` needs neither torch nor the models, and importing them
costs seconds and ~0.7 GiB of resident memory before any work starts (torch alone). A package whose
``__init__`` imports every submodule makes every ``import package.sub`` pay for all of them; with
:func:`lazy_exports` the package keeps its public names (``from package import Name``, ``package.Name``,
``__all__``) while ``import package.sub`` loads ``sub`` only.

Usage, at the end of a package's ``__init__.py`` (the same names stay importable under ``TYPE_CHECKING``
for type checkers)::

    __getattr__, __dir__ = lazy_exports(__name__, {"Name": ".module", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of a package with lazily imported exports.

    Args:
        package: The package's ``__name__``.
        exports: Public name -> the submodule that defines it, relative (``".models"``) or absolute.

    Returns:
        ``(__getattr__, __dir__)``. ``__getattr__(name)`` imports the submodule of ``name``, caches the value
        in the package's namespace (later look-ups are plain attribute reads) and returns it; a submodule
        name that is not an export (``package.models``) is imported as a submodule; anything else raises
        ``AttributeError`` as a module would.
    """
    table = dict(exports)

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module, package), name)
        elif not name.startswith("__"):
            try:
                value = importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{package}.{name}":  # the submodule exists but something it imports does not
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
