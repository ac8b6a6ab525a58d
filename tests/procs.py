"""Find live processes by a marker in their command line or environment (Linux /proc)."""

from __future__ import annotations

import os
from pathlib import Path


def procs_mentioning(marker: str, pids: bool = False) -> list:
    """Command lines (or pids) of live processes whose command line or environment mention
    ``marker``."""
    found = []
    needle_b = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (needle_b in cmd or needle_b in env):
            found.append(
                int(entry.name) if pids else cmd.replace(b"\0", b" ").decode(errors="replace")
            )
    return found


def stop(procs: list, marker: str) -> None:
    """SIGTERM the process groups of ``procs`` (our children), SIGKILL what is left, then
    SIGKILL any process still mentioning ``marker`` (their descendants, by pid)."""
    import signal
    import subprocess
    import time

    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for _ in range(20):
        pids = procs_mentioning(marker, pids=True)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.25)
