"""The pages' warehouse reads, cached with ``st.cache_data`` and keyed on the warehouse's table versions.

``read(fn, path, ...)`` calls ``fn(path, ...)`` (a query function of ``dashboard.data`` or
``dashboard.explore``) once per distinct arguments and ``data.table_versions(path)``: the lineage version
of every published table plus a stamp of the run registry. A publish, a new run or a finished run changes
that key, so the next page load reads afresh; otherwise every rerun of a page is served from memory. The
key itself is recomputed only when the DuckDB file (or its write-ahead log) changed size or time, which a
``stat`` tells without opening the database.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import streamlit as st

from recsys.dashboard import data

T = TypeVar("T")


def _stat(path: Path) -> tuple[tuple[int, int] | None, ...]:
    out: list[tuple[int, int] | None] = []
    for file in (path, path.with_name(path.name + ".wal")):
        try:
            s = file.stat()
            out.append((s.st_mtime_ns, s.st_size))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


@st.cache_data(show_spinner=False, max_entries=32)
def _versions(path: str, stat: tuple[tuple[int, int] | None, ...]) -> tuple[tuple[str, str], ...]:
    return data.table_versions(path)


def versions(path: str | Path) -> tuple[tuple[str, str], ...]:
    """``data.table_versions(path)``, re-read only when the file changed on disk."""
    p = Path(path)
    return _versions(str(p), _stat(p))


def _frozen(value: Any) -> Any:
    if isinstance(value, list | tuple | set | frozenset):
        return tuple(_frozen(v) for v in value)
    return value


@st.cache_data(show_spinner=False, max_entries=512)
def _call(
    module: str,
    name: str,
    path: str,
    key: tuple[tuple[str, str], ...],
    args: tuple[Any, ...],
    kwargs: tuple[tuple[str, Any], ...],
) -> Any:
    fn = getattr(importlib.import_module(module), name)
    return fn(path, *args, **dict(kwargs))


def read(fn: Callable[..., T], path: str | Path, *args: Any, **kwargs: Any) -> T:
    """``fn(path, *args, **kwargs)``, from the cache while the warehouse's table versions are unchanged."""
    frozen_kwargs = tuple(sorted((k, _frozen(v)) for k, v in kwargs.items()))
    return _call(fn.__module__, fn.__name__, str(path), versions(path), _frozen(args), frozen_kwargs)
