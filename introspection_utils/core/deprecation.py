"""Old import paths and names kept for one release: :func:`moved` gives a shim module the ``__getattr__`` that finds
a name in its new home, :func:`renamed` a module the one that hands back a renamed function; both warn
(``DeprecationWarning``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def moved(old: str, *homes: str, removed_in: str = "0.3") -> Callable[[str], Any]:
    """The module ``__getattr__`` of the shim ``old``: a name is looked up in ``homes`` (full module names, in order);
    the first that defines it answers, with a warning naming the new path. Submodules of a home package are found too
    (``experiments.tasks.forced_choice``)."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for home in homes:  # a home that is a submodule of the shim itself (a package's own modules) is no move
            if home == f"{old}.{name}":
                return import_module(home)
        for home in homes:
            module = import_module(home)
            if hasattr(module, name):
                value = getattr(module, name)
            else:
                try:
                    value = import_module(f"{home}.{name}")
                except ModuleNotFoundError:
                    continue
            warnings.warn(f"{old}.{name} moved to {home}.{name}; the old path goes in {removed_in}",
                          DeprecationWarning, stacklevel=2)
            return value
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved: look in {', '.join(homes)})")

    return __getattr__


def renamed(module: str, namespace: Mapping[str, Any], names: Mapping[str, str],
            removed_in: str = "0.3") -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``names`` (old name → new name in the same module): reading an old name warns
    (``DeprecationWarning``, naming the new one) and returns the new object; any other missing name is an
    ``AttributeError`` as usual."""

    def __getattr__(name: str) -> Any:
        if name in names:
            warnings.warn(f"{module}.{name} is renamed {module}.{names[name]}; the old name goes in {removed_in}",
                          DeprecationWarning, stacklevel=2)
            return namespace[names[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
