"""Old public names kept for one release: :func:`renamed` gives a module the ``__getattr__`` that warns and hands
back the new name; the modules whose functions were renamed call it."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any


def renamed(module: str, namespace: Mapping[str, Any], names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``names`` (old name → new name in the same module): reading an old name warns
    (``DeprecationWarning``, naming the new one) and returns the new object; any other missing name is an
    ``AttributeError`` as usual."""

    def __getattr__(name: str) -> Any:
        if name in names:
            warnings.warn(f"{module}.{name} is renamed {module}.{names[name]}; the old name goes in the next release",
                          DeprecationWarning, stacklevel=2)
            return namespace[names[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
