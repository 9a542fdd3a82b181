"""Supervise a child server (``recsys serve``, ``recsys dashboard``): the child runs in a session and
process group of its own; SIGTERM and SIGINT received by the supervisor are forwarded to that process group,
a stop is waited for ``grace_s`` seconds, then whatever is left of the session is killed, and the supervisor
exits with the child's status.

Why a session of its own: a server such as ``bentoml serve`` forks worker processes. Signalling only the
direct child (or nothing at all, when the supervisor itself is killed) leaves the workers running,
re-parented to init and still holding the port. The graceful stop goes to the child's process group (the
server stops its workers itself); killing, and the clean-up after the child has exited, reach every process
of the session, since BentoML moves its workers to process groups of their own. A Ctrl-C in a terminal
reaches only the foreground process group, which the child has left, so it is forwarded too; a second
signal while the stop is under way kills the session at once. On Linux the child also gets SIGTERM if the
supervisor dies without forwarding anything (parent-death signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

import psutil

FORWARDED = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child, before exec
    """Ask Linux to send the child SIGTERM when its parent exits (best effort: other systems skip it)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: the child and everything it started, including
    workers that moved to process groups of their own (BentoML's do) or were re-parented to init."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
        except (OSError, psutil.Error):  # gone meanwhile
            continue
    return members


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _signal_session(sid: int, signum: int) -> None:
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Runs ``argv`` as the leader of a new session and process group, and stops all of it on a signal."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        grace_s: float = 20.0,
        poll_s: float = 0.1,
    ) -> None:
        if grace_s <= 0 or poll_s <= 0:
            raise ValueError(f"grace_s and poll_s must be > 0, got {grace_s} and {poll_s}")
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.received: list[int] = []  # signals forwarded, in order
        self._deadline: float | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signum)
        first = self._deadline is None
        if first:
            self._deadline = time.monotonic() + self.grace_s
        if self.process is None:  # not started yet: run() forwards it once it is
            return
        if first:
            _signal_group(self.process.pid, signum)
        else:  # a second Ctrl-C / SIGTERM: stop waiting
            _signal_session(self.process.pid, signal.SIGKILL)

    def run(self) -> int:
        """Start the child, wait for it (forwarding signals), clean its session up; the exit status."""
        previous = {s: signal.getsignal(s) for s in FORWARDED}
        # Handlers first: a signal that arrives between the fork and the wait is still forwarded.
        for s in FORWARDED:
            signal.signal(s, self._forward)
        try:
            self.process = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own session and process group (pgid = its pid)
                preexec_fn=_die_with_parent,
            )
            if self.received:
                _signal_group(self.process.pid, self.received[0])
            returncode = self._wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.process is not None:
                self._reap_session(self.process.pid)
        return exit_status(returncode)

    def _wait(self) -> int:
        assert self.process is not None
        while True:
            try:
                return self.process.wait(timeout=self.poll_s)
            except subprocess.TimeoutExpired:
                pass
            if self._deadline is not None and time.monotonic() > self._deadline:
                _signal_session(self.process.pid, signal.SIGKILL)
                return self.process.wait()

    def _reap_session(self, sid: int) -> None:
        """Stop what the child left behind (workers of a child that exited first): SIGTERM, then SIGKILL
        after the grace period."""
        if self.process is not None and self.process.poll() is None:
            _signal_session(sid, signal.SIGKILL)
            self.process.wait()
        if not session_members(sid):
            return
        _signal_session(sid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while session_members(sid) and time.monotonic() < deadline:
            time.sleep(self.poll_s)
        _signal_session(sid, signal.SIGKILL)


def run_supervised(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    grace_s: float = 20.0,
) -> int:
    """Run ``argv`` under a ``Supervisor``; returns its exit status (for ``typer.Exit``)."""
    return Supervisor(argv, env=env, cwd=cwd, grace_s=grace_s).run()
