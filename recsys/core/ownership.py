"""Who owns a temporary file, a lock or a running run: a process id plus that process's start time.

A pid alone is not enough: pids are reused, so a sweep that trusted one could delete the live temp file of an
unrelated later process. The start time (from psutil, in hundredths of a second) makes the pair unique for
the life of the machine. Anything named with an owner tag is swept only once its owner is gone.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import time
from pathlib import Path

import psutil

# ".<name>.<pid>-<start>.<random>.tmp": the owner tag sits between the target's name and the random part.
OWNER_TAG = re.compile(r"\.(?P<pid>\d+)-(?P<start>\d+)\.")
# Temp files written before owner tags existed carry no owner; they are swept only once this old.
UNOWNED_GRACE_S = 3600.0


def _create_time(pid: int) -> int | None:
    try:
        return round(psutil.Process(pid).create_time() * 100)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


@functools.cache
def _own_start(pid: int) -> int | None:
    # Keyed on the pid so that a forked child computes its own.
    return _create_time(pid)


def owner_tag(pid: int | None = None) -> str:
    """``<pid>-<start time>`` of this process (or of ``pid``)."""
    pid = os.getpid() if pid is None else pid
    start = _own_start(pid) if pid == os.getpid() else _create_time(pid)
    if start is None:
        raise ProcessLookupError(f"no process {pid}")
    return f"{pid}-{start}"


def is_alive(tag: str) -> bool:
    """Whether the process named by an owner tag (``<pid>-<start>``) still runs."""
    pid_s, _, start_s = tag.partition("-")
    if not (pid_s.isdigit() and start_s.isdigit()):
        raise ValueError(f"owner tag must be '<pid>-<start>', got {tag!r}")
    pid = int(pid_s)
    if pid == os.getpid():
        return _own_start(pid) == int(start_s)
    try:
        proc = psutil.Process(pid)
        alive = proc.status() != psutil.STATUS_ZOMBIE
        return alive and abs(round(proc.create_time() * 100) - int(start_s)) <= 1
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def tag_in_name(name: str) -> str | None:
    """The owner tag embedded in a temp file's name, or None for an unowned (older) name."""
    match = OWNER_TAG.search(name)
    return f"{match['pid']}-{match['start']}" if match else None


def sweep_stale_temps(root: str | Path, *, now: float | None = None) -> list[Path]:
    """Delete the ``.*.tmp`` files and directories under ``root`` whose owner is gone; returns them.

    A temp whose owner still runs is never touched, so any process may sweep at any time, under no lock.
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.exists():
        return removed
    now = time.time() if now is None else now
    for path in sorted(root.rglob(".*.tmp"), key=lambda p: len(p.parts), reverse=True):
        tag = tag_in_name(path.name)
        try:
            if tag is not None:
                if is_alive(tag):
                    continue
            elif now - path.lstat().st_mtime < UNOWNED_GRACE_S:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except FileNotFoundError:  # its owner finished (renamed it) while we looked
            continue
        removed.append(path)
    return removed
