"""Write files so that a reader sees either the old file or the complete new one, never half of it.

Temporary names carry the writer's owner tag (``recsys.core.ownership``):
``.<name>.<pid>-<start>.<rand>.tmp``, so a sweep after a crash removes only the temps of processes that
are gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from recsys.core.ownership import owner_tag


def temp_prefix(target: Path) -> str:
    return f".{target.name}.{owner_tag()}."


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def owned_tempdir(parent: str | Path, name: str) -> Path:
    """Create an empty temporary directory ``.<name>.<owner>.<rand>.tmp`` in ``parent`` (caller removes it).

    A process killed before removing it leaves a directory that ``sweep_stale_temps`` removes once that
    process is gone, and never before.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(parent / name), suffix=".tmp", dir=parent))


@contextlib.contextmanager
def atomic_dir(parent: str | Path, name: str) -> Iterator[Path]:
    """Yield an empty owned temporary directory ``.<name>.<owner>.<rand>.tmp`` in ``parent``.

    The caller renames it into place (see ``recsys.training.checkpoint``); if it is still there when the
    block ends (an error), it is removed.
    """
    tmp = owned_tempdir(parent, name)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
