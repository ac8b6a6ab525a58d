"""Start child processes and make sure every one of them stops: on exit, on a signal, on error.

Each child starts in its own session (process group), so one signal reaches
everything it forks, and (Linux) with a parent-death signal: if this process
dies without cleaning up (SIGKILL), every child still gets SIGTERM.

Flower's SuperLink starts SuperExec in a *new* session, which a process-group
signal does not reach, so every child also carries an
environment variable unique to its :class:`Supervisor`; :meth:`Supervisor.stop_all`
finally kills any process on the machine that still carries it (Linux ``/proc``).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

__all__ = ["Supervisor", "install_signal_handlers", "tagged_pids"]

_TAG_PREFIX = "FEDCORE_SUPERVISOR_"


def tagged_pids(tag_var: str) -> list[int]:
    """Pids (not this process) whose environment holds ``tag_var`` (Linux ``/proc``)."""
    needle = f"{tag_var}=1".encode()
    me = os.getpid()
    out = []
    proc = Path("/proc")
    if not proc.is_dir():  # pragma: no cover - non-Linux: process groups only
        return out
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            out.append(int(entry.name))
    return out


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask the kernel to SIGTERM this process when its parent dies (Linux ``prctl``)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into ``KeyboardInterrupt`` so ``finally`` blocks run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


class Supervisor:
    """The children of one fedcore command; :meth:`stop_all` stops all of them.

    Use as a context manager; the exit stops every child even on an exception
    or ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM after
    :func:`install_signal_handlers`).
    """

    def __init__(self) -> None:
        self.tag_var = _TAG_PREFIX + secrets.token_hex(6).upper()
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a child: ours, plus the tag, the venv on PATH, and ``extra``."""
        env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)
        if bindir not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
        env.update(extra or {})
        env[self.tag_var] = "1"
        return env

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: IO[Any] | int | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as child ``name`` in its own session."""
        proc = subprocess.Popen(  # noqa: S603 - argv built by fedcore
            list(argv),
            env=self.env(env),
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self.children[name] = proc
        return proc

    def signal_group(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        """Send ``sig`` to ``proc``'s process group (ignored once it is gone)."""
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every child's group, wait ``grace`` s, SIGKILL what is left, then strays."""
        live = [p for p in self.children.values()]
        for p in live:
            self.signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in live:
            self.signal_group(p, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        # Grandchildren in sessions of their own (Flower's SuperExec, its ServerApp).
        for _ in range(3):
            strays = tagged_pids(self.tag_var)
            if not strays:
                break
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGTERM if _ == 0 else signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.5 if _ == 0 else 0.2)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
