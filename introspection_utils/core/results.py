"""The results store: a table beside the metadata that says how it was made (``<name>.csv`` + ``<name>.meta.json``,
written atomically); every experiment saves through it and :func:`load_result` reads it back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from introspection_utils.core.paths import atomic_write


@dataclass
class SweepResult:
    """A sweep's tidy table and the metadata that says exactly how it was made."""

    df: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.csv`` and ``<path>.meta.json`` (atomically); returns the CSV path."""
        path = Path(path).with_suffix(".csv")
        atomic_write(path, self.df.to_csv(index=False))
        atomic_write(path.with_suffix(".meta.json"), json.dumps(self.meta, indent=1, default=str))
        return path


def load_result(path: str | Path) -> SweepResult:
    """Read a :class:`SweepResult` saved with :meth:`SweepResult.save`."""
    path = Path(path).with_suffix(".csv")
    df = pd.read_csv(path, dtype={"vector_seed": "Int64", "null_kind": str})
    if "null_kind" in df:
        df["null_kind"] = df["null_kind"].fillna("")
    return SweepResult(df, saved_meta(path))


def saved_meta(path: str | Path) -> dict:
    """The metadata of the table saved at ``path`` (``<path>.meta.json``), read without the table."""
    return json.loads(Path(path).with_suffix(".meta.json").read_text(encoding="utf-8"))


def saved_table(path: str | Path) -> pd.DataFrame | None:
    """The table saved at ``path`` (:func:`load_result`'s), or ``None`` where none was saved."""
    return load_result(path).df if Path(path).with_suffix(".csv").is_file() else None


def concept_rows(df: pd.DataFrame, concept: str) -> pd.DataFrame:
    """The rows of ``concept`` in a tidy table (sweep, lens, ...); an empty table or an absent concept is a
    ``ValueError`` that lists the concepts the table has."""
    if df.empty:
        raise ValueError("the sweep table is empty")
    if concept not in set(df["concept"]):
        raise ValueError(f"concept {concept!r} is not in the table ({', '.join(sorted(df['concept'].unique()))})")
    return df[df["concept"] == concept]
