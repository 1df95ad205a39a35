"""The experiment registry: :class:`Experiment` (one notebook of the series: what computes it, reads it, draws and
saves) and :class:`Registry`, which holds entries by number and refuses a duplicate. The series' entries are
registered in ``apps/catalog.py``; the runner, the notebook guide, the findings and the tests read them there."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from types import ModuleType
from typing import Any

_NOTEBOOK = re.compile(r"^\d\d_[a-z0-9_]+$")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
PACKAGE = "introspection_utils"


def name_of(code: ModuleType | Callable[..., Any]) -> str:
    """A module's or a function's name inside the package: ``"experiments.sweeps"``,
    ``"readings.sentences.describe_scale_sweep"`` (what the runner's list prints)."""
    if isinstance(code, ModuleType):
        name = code.__name__
    else:
        name = f"{code.__module__}.{code.__qualname__}"
    return name.removeprefix(f"{PACKAGE}.")


@dataclass(frozen=True)
class Experiment:
    """One notebook of the series.

    ``notebook``: the file's stem (``"02_scale_sweep"``); ``title``: its short name; ``question``: what it answers
    (the notebook guide's column); ``modules``: the package modules whose calls compute it (``sweeps``; the engine
    itself for 00 and 01); ``figures``: the names it saves figures under; ``tables``: the tables it saves into
    ``results_dir`` (a part the run fills in is written in braces: ``"atlas{_format}_sweep"``); ``readings``: the
    functions whose sentences it prints; ``findings``: the function that recomputes those sentences from its saved
    tables for ``findings.md`` (``folder(results) -> list[str]``), or ``None`` when the findings have no section of
    its own; ``guide_figure``/``alt``: the figure the notebook guide shows and its alt text.
    """

    notebook: str
    title: str
    question: str
    modules: tuple[ModuleType, ...]
    figures: tuple[str, ...]
    tables: tuple[str, ...]
    readings: tuple[Callable[..., str], ...]
    guide_figure: str
    alt: str
    findings: Callable[..., list[str]] | None = None

    def __post_init__(self) -> None:
        if not _NOTEBOOK.match(self.notebook):
            raise ValueError(f"notebook {self.notebook!r}: write the file's stem, e.g. '02_scale_sweep'")
        if not any(_matches(self.guide_figure, f) for f in self.figures):
            raise ValueError(f"{self.notebook}: guide_figure {self.guide_figure!r} is none of its figures "
                             f"{list(self.figures)}")
        for module in self.modules:
            if not (isinstance(module, ModuleType) and module.__name__.startswith(f"{PACKAGE}.")):
                raise TypeError(f"{self.notebook}: modules holds the package's modules themselves, not {module!r}")
        for function in (*self.readings, *([self.findings] if self.findings is not None else [])):
            if isinstance(function, (str, ModuleType)) or not callable(function):
                raise TypeError(f"{self.notebook}: readings and findings hold functions, not {function!r}")

    @property
    def number(self) -> str:
        """The two-digit prefix (``"02"``): how the runner selects it and how its findings table is named."""
        return self.notebook[:2]

    @property
    def findings_table(self) -> str:
        """The name of its parameter table in a findings file (``["02"]`` in ``data/findings/<model>.toml``)."""
        return self.number

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(name_of(m) for m in self.modules)

    @property
    def reading_names(self) -> tuple[str, ...]:
        return tuple(name_of(f) for f in self.readings)


class Registry(Collection[Experiment]):
    """Experiments by number, in the order they were registered (SAELens's ``registry.py``: objects, and a second
    registration of a number or a notebook is an error, not an overwrite)."""

    def __init__(self, entries: tuple[Experiment, ...] = ()) -> None:
        self._entries: dict[str, Experiment] = {}
        for entry in entries:
            self.register(entry)

    def register(self, entry: Experiment) -> Experiment:
        """Add ``entry``; a ``ValueError`` if its number or notebook is registered already."""
        if not isinstance(entry, Experiment):
            raise TypeError(f"register an Experiment, not {entry!r}")
        taken = self._entries.get(entry.number) or next(
            (e for e in self._entries.values() if e.notebook == entry.notebook), None)
        if taken is not None:
            raise ValueError(f"experiment {entry.notebook!r} is registered already (as {taken.notebook!r}, "
                             f"number {taken.number})")
        self._entries[entry.number] = entry
        return entry

    def by_number(self, number: str) -> Experiment:
        """The entry of notebook ``number`` (``"02"``); a ``KeyError`` naming the numbers there are otherwise."""
        if number not in self._entries:
            raise KeyError(f"no experiment {number!r} in the registry; it has {list(self._entries)}")
        return self._entries[number]

    def __iter__(self) -> Iterator[Experiment]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: object) -> bool:
        return entry in self._entries.values()


def pattern(name: str) -> str:
    """A figure or table name as a glob: each ``{part}`` the run fills in becomes ``*``."""
    return _PLACEHOLDER.sub("*", name)


def _matches(name: str, template: str) -> bool:
    return fnmatchcase(name, pattern(template))
