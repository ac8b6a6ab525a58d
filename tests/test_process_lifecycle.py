"""``fedcore simulate`` leaves no process behind: after SIGKILL, and after Ctrl-C.

Both tests start the real command (``--workers 2``: the server's process plus one
forked worker), wait until a round is running, signal it as a user or a terminal
would, and look for every process of the run (found with psutil before the signal).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

FEDCORE = str(Path(sys.executable).parent / "fedcore")
CONFIG = """
[run]
rounds = {rounds}
clients = 3
centralized-baseline = false
[data]
source = "digits"
[model]
factory = "mlp"
[train]
local-epochs = 2
[secagg]
enabled = false
"""


def _start(
    tmp_path: Path, config: str = "exp.toml", *args: str
) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """``fedcore simulate`` in its own session; returns once round 2 runs, with its workers."""
    (tmp_path / config).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / config).write_text(CONFIG.format(rounds=200))
    proc = subprocess.Popen(
        [FEDCORE, "simulate", config, "--out", "run", "--workers", "2", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.monotonic() + 240
    while not (tmp_path / "run" / "metrics.json").exists():  # round 1 is done
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "round 1 did not finish in 240 s"
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "a run with --workers 2 has a worker process"
    return proc, children


def _orphan(parent_pid: int) -> None:  # (module level: a multiprocessing target)
    from fedcore.engines.processes import die_with_parent

    die_with_parent(parent_pid)
    time.sleep(60)


def test_a_worker_whose_parent_is_already_gone_exits_at_once():
    import multiprocessing as mp

    child = mp.get_context("fork").Process(target=_orphan, args=(1,))  # "re-parented to init"
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 1


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_is_killed_with_its_parent():
    # A middle process forks a worker that asks to die with it, then is SIGKILLed.
    code = (
        "import os, sys, time\n"
        "from fedcore.engines.processes import die_with_parent\n"
        "parent = os.getpid()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    die_with_parent(parent)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    middle = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker = psutil.Process(int(middle.stdout.readline()))
    time.sleep(0.5)  # (the worker has made its request)
    middle.kill()
    middle.wait(timeout=10)
    middle.stdout.close()
    try:
        worker.wait(timeout=10)
    except psutil.TimeoutExpired:
        worker.kill()
        raise AssertionError("the worker outlived its SIGKILLed parent") from None


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigkill_of_simulate_leaves_no_process_alive(tmp_path):
    proc, children = _start(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    deadline = time.monotonic() + 10
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(children)
    for p in left:  # (clean up before failing)
        p.kill()
    assert not left, f"alive 10 s after SIGKILL of the server: {[p.cmdline() for p in left]}"


def test_ctrl_c_stops_within_3_s_prints_the_resume_command_and_resuming_finishes(tmp_path):
    # A config outside the working directory, and an override it lacks: both must be
    # part of the resume command.
    proc, children = _start(tmp_path, "conf/exp.toml", "--rounds", "6")
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal delivers Ctrl-C
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    took = time.monotonic() - t0
    assert proc.returncode == 130, out
    assert took <= 3.0, f"Ctrl-C took {took:.1f} s\n{out}"
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert not _alive(children), "a worker outlived Ctrl-C"
    command = "fedcore simulate conf/exp.toml --rounds 6 --resume run"
    assert f"to continue this run: {command}\n" in out, out

    argv = shlex.split(command)
    resumed = subprocess.run(
        [FEDCORE, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    import json

    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in rows] == list(range(1, 7))
