"""Old import paths kept for one release: :func:`moved` gives a shim module the ``__getattr__`` that finds a name in
its new home and warns once per name (``DeprecationWarning``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
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
