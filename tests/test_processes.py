"""ProcessTree: children stop with it, even grandchildren in their own session, even on SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedcore.engines.processes import ProcessTree, free_port
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
    tree = ProcessTree()
    tree.start("child", [sys.executable, "-c", child])
    deadline = time.monotonic() + 10
    while len(procs_mentioning(marker)) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert procs_mentioning(marker), "the grandchild did not start"
    tree.stop_all(grace=2)
    assert _wait_gone(marker) == []


def test_children_die_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    marker = str(tmp_path / "orphan-marker")
    parent = textwrap.dedent(f"""
        import sys, time
        from fedcore.engines.processes import ProcessTree
        tree = ProcessTree()
        tree.start("child", [sys.executable, "-c", "import time; time.sleep(120)", {marker!r}])
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


def test_the_tree_follows_samples_and_stops_what_it_started(tmp_path: Path) -> None:
    marker = str(tmp_path / "tree-marker")
    with ProcessTree(pss=False) as tree:
        proc = tree.start("sleeper", [sys.executable, "-c", "import time; time.sleep(120)", marker])
        assert tree.children == {"sleeper": proc}
        now = tree.sample()
        assert now.processes == 1 and now.rss > 0
        assert [p.pid for p in tree.survivors()] == [proc.pid]
        assert tree.env()[tree.marker_variable] == "1"
    assert proc.poll() is not None  # leaving the block stopped it
    assert tree.survivors() == [] and _wait_gone(marker) == []


def test_nested_trees_mark_grandchildren_with_both_markers(tmp_path: Path) -> None:
    # `fedcore deploy-local` runs `fedcore server`, which runs its own tree: the outer tree
    # still finds (and stops) the inner tree's children, even in a session of their own
    marker = str(tmp_path / "nested-marker")
    inner = textwrap.dedent(f"""
        import time
        from fedcore.engines.processes import ProcessTree
        tree = ProcessTree()
        tree.start("leaf", [{sys.executable!r}, "-c", "import time; time.sleep(120)", {marker!r}])
        time.sleep(120)
    """)
    outer = ProcessTree()
    outer.start("inner", [sys.executable, "-c", inner])
    deadline = time.monotonic() + 20
    while not procs_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    leaf = procs_mentioning(marker, pids=True)
    assert len(leaf) == 1
    assert outer.marker_variable in Path(f"/proc/{leaf[0]}/environ").read_text()
    outer.stop_all(grace=2)
    assert _wait_gone(marker) == []


def test_free_port_can_be_bound() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
