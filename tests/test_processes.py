"""ProcessTree: children stop with it, even grandchildren in their own session, even on SIGKILL."""

from __future__ import annotations

import json
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


_FRAGMENTED_HEAP = textwrap.dedent(
    """
    import json, sys
    from fedcore.engines.processes import FreedMemory

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    freed = FreedMemory(min_busy=0.5)
    # 96 MiB in 16 KiB malloc'ed blocks; every other one is freed, so the free memory
    # is in holes inside the heap that glibc does not return on its own
    blocks = [bytes(16384) for _ in range(6_000)]
    keep = blocks[1::2]
    del blocks
    before = rss()
    small = freed.after(0.2)  # below min_busy: no trim yet
    after_small = rss()
    trimmed = freed.after(0.3)  # adds up to min_busy
    print(json.dumps({"before": before, "after_small": after_small, "after": rss(),
                      "small": small, "trimmed": trimmed, "kept": len(keep)}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim")
def test_freed_memory_returns_the_holes_of_the_heap_once_enough_work_has_added_up() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["small"] is False and got["trimmed"] is True
    assert got["after_small"] > got["before"] - 5  # nothing was released by the first call
    assert got["after"] < got["before"] - 25, got  # ~48 MiB of holes released
