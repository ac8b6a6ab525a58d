"""Supervisor: children stop with it, even grandchildren in their own session, even on SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedcore.deploy.processes import Supervisor
from tests.procs import procs_mentioning

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and prctl")


def _wait_gone(marker: str, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := procs_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_stop_all_reaches_grandchildren_in_other_sessions(tmp_path: Path) -> None:
    marker = str(tmp_path / "grandchild-marker")
    # the child starts a grandchild in a new session (like Flower's SuperLink starts SuperExec)
    child = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", {marker!r}],
                         start_new_session=True)
        time.sleep(120)
    """)
    sup = Supervisor()
    sup.start("child", [sys.executable, "-c", child])
    deadline = time.monotonic() + 10
    while len(procs_mentioning(marker)) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert procs_mentioning(marker), "the grandchild did not start"
    sup.stop_all(grace=2)
    assert _wait_gone(marker) == []


def test_children_die_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    marker = str(tmp_path / "orphan-marker")
    parent = textwrap.dedent(f"""
        import sys, time
        from fedcore.deploy.processes import Supervisor
        sup = Supervisor()
        sup.start("child", [sys.executable, "-c", "import time; time.sleep(120)", {marker!r}])
        print("ready", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"  # type: ignore[union-attr]
        assert procs_mentioning(marker)
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup code runs in the parent
        proc.wait(timeout=10)
        assert _wait_gone(marker) == []  # the kernel's parent-death signal stopped the child
    finally:
        proc.kill()
        for pid in procs_mentioning(marker, pids=True):
            os.kill(pid, signal.SIGKILL)
