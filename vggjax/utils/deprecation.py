"""Names that moved keep working for one release, with a DeprecationWarning naming the new place."""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def moved_module(old: str, new: str) -> Callable[[str], Any]:
    """A module-level `__getattr__` (PEP 562) for module `old`, whose contents now live in module
    `new`: each attribute is `new`'s, with a DeprecationWarning saying where to import it from."""
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = importlib.import_module(new)
        if not hasattr(target, name):
            raise AttributeError(f"module {old!r} (now {new!r}) has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved to {new}.{name}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(target, name)
    return __getattr__


def moved_names(old: str, moves: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for module `old`, some of whose names moved: {name: new
    module}. Each moved name is the new module's, with a DeprecationWarning; others raise."""
    def __getattr__(name: str) -> Any:
        if name not in moves:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        return moved_module(old, moves[name])(name)
    return __getattr__
