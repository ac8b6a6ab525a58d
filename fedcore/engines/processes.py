"""Start, track and stop every process fedcore runs: one tree per command or engine run.

A :class:`ProcessTree` starts child processes (:meth:`ProcessTree.start`) or
follows ones started elsewhere (:meth:`ProcessTree.add_root`), follows all
their descendants, sums their memory, and stops every one of them: on
:meth:`ProcessTree.stop_all`, on leaving its ``with`` block (also on an
exception, Ctrl-C, or SIGTERM after :func:`install_signal_handlers`), and
(Linux) even when this process dies without cleaning up.

- Each child starts in its own session (process group), so one signal reaches
  everything it forks, and (Linux) with a parent-death signal: if this process
  dies (SIGKILL), every child still gets SIGTERM.
- Every process started with :meth:`ProcessTree.env` (which :meth:`~ProcessTree.start`
  uses) carries an environment variable unique to its tree, inherited by every
  descendant. A descendant in a session of its own (Flower's SuperLink starts
  SuperExec that way), or re-parented before it was seen, is still found, and
  only ours are: the name is a fresh random token. Trees nest: a child's own
  tree adds its variable to the one it inherited.

Used by ``fedcore server``, ``fedcore deploy-local`` and
:mod:`fedcore.engines.flower_sim` to leave no process behind, and by the
benchmarks to measure peak memory summed over all processes of a run.
:func:`free_port` picks the loopback ports those processes listen on.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psutil

__all__ = [
    "FreedMemory",
    "MemorySample",
    "ProcessTree",
    "SeenProcess",
    "die_with_parent",
    "free_port",
    "install_signal_handlers",
]

#: Prefix of the environment variable that marks the processes of one tree.
MARKER_PREFIX = "FEDCORE_TREE_"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (the OS picks it; take it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into ``KeyboardInterrupt`` so ``finally`` blocks run."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel to SIGTERM the child when we die (Linux ``prctl``).

    ``prctl`` is looked up here, in the parent: between ``fork`` and ``exec`` the
    child only calls it.
    """
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return None

    def preexec() -> None:  # pragma: no cover - runs in the child before exec
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


def one_malloc_arena() -> None:
    """Let every thread of this process (and of the workers it forks) share one glibc arena.

    glibc gives each thread that allocates its own arena (up to eight per core), whose
    freed pages stay with it. The embedded engine's server runs its loop, executor 0
    and a sender thread per worker: with one arena the run's peak PSS fell by 5-11
    MiB (10 clients x 3 rounds: 306-307 MiB vs 312-317 MiB, docs/benchmarks.md), the
    round times unchanged within this machine's noise. Equivalent to
    ``MALLOC_ARENA_MAX=1``, which an environment that sets it overrides; nothing
    happens where glibc's ``mallopt`` is missing.
    """
    if sys.platform != "linux" or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX (malloc.h)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class FreedMemory:
    """Hands the pages a process has freed back to the kernel after the work that freed them.

    glibc keeps freed memory inside its heap for reuse; only what is free at the
    heap's top is returned on its own. A client's training and the messages it
    decodes leave free holes in the middle that stay resident (and so count in
    the run's RSS and PSS) until ``malloc_trim`` releases them. The embedded engine
    calls :meth:`after` after each reply in every executor: measured on 10 clients
    x 3 rounds (``benchmarks/simulation_engines.py``), the run's peak PSS fell from
    306-318 to 295-300 MiB; one trim takes 0.01-3 ms (median ~0.05 ms). It trims
    only after ``min_busy`` seconds of work, so that its cost stays a few percent
    of the work's (1,000 clients of a few ms each are trimmed about every
    ``min_busy`` seconds). Nothing happens where glibc's ``malloc_trim`` is missing.
    """

    def __init__(self, min_busy: float = 0.02) -> None:
        self.min_busy = min_busy
        self._busy = 0.0
        self._trim: Callable[[int], int] | None = None
        if sys.platform == "linux":
            try:
                import ctypes

                self._trim = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError):  # pragma: no cover - not glibc
                pass

    def after(self, busy: float) -> bool:
        """Count ``busy`` seconds of work; trim once ``min_busy`` has added up. Whether it did."""
        self._busy += busy
        if self._trim is None or self._busy < self.min_busy:
            return False
        self._trim(0)
        self._busy = 0.0
        return True


def die_with_parent(parent_pid: int) -> None:
    """Make this (forked or spawned) process die with ``parent_pid``, even on its SIGKILL.

    Asks the kernel (Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``) to kill this process
    when its parent dies, then closes the race of a parent that died before the
    request: already re-parented (``os.getppid() != parent_pid``) means exit now.
    Elsewhere only the check is made.
    """
    if sys.platform == "linux":
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


@dataclass(frozen=True)
class MemorySample:
    """Memory of the whole tree at one instant, in bytes.

    ``rss`` sums each process's resident set (pages shared between processes
    count once per process); ``pss`` sums the proportional set size (a shared
    page counts 1/k in each of the k processes that map it), so it does not
    double-count and is the better "memory the run uses" figure.
    """

    processes: int
    rss: int
    pss: int


@dataclass(frozen=True)
class SeenProcess:
    """One process of a tree: ``(pid, create_time)`` identifies it even if the pid is reused."""

    pid: int
    create_time: float
    command: str

    def running(self) -> bool:
        """Tell whether this very process (not a later one with its pid) is alive."""
        try:
            proc = psutil.Process(self.pid)
            return proc.create_time() == self.create_time and (
                proc.status() != psutil.STATUS_ZOMBIE
            )
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False


class ProcessTree:
    """The processes started from a set of roots: start, memory sampling, cleanup.

    Use as a context manager; leaving it runs :meth:`stop_all`.

    Parameters
    ----------
    sample_interval : float (default: 0.2)
        Seconds between samples of the background sampler (:meth:`start_sampling`).
    pss : bool (default: True)
        Also read each process's PSS (``/proc/<pid>/smaps_rollup``; Linux).

    """

    def __init__(self, *, sample_interval: float = 0.2, pss: bool = True) -> None:
        self.marker = secrets.token_hex(8)
        #: The environment variable (value ``"1"``) every process of this tree carries.
        self.marker_variable = MARKER_PREFIX + self.marker.upper()
        self.sample_interval = sample_interval
        self.with_pss = pss
        #: The children :meth:`start` started, by name.
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._roots: list[psutil.Process] = []
        self._seen: dict[tuple[int, float], psutil.Process] = {}
        self._names: dict[tuple[int, float], str] = {}  # first words of the command line
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak = MemorySample(0, 0, 0)
        #: ``(command, rss, pss)`` of each process in the sample with the highest RSS sum
        self.peak_detail: list[tuple[str, int, int]] = []
        self.samples = 0

    # -- starting -------------------------------------------------------------
    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) plus this tree's marker and this venv on PATH."""
        env = dict(os.environ if base is None else base)
        bindir = str(Path(sys.executable).parent)
        if bindir not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
        env[self.marker_variable] = "1"
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
        """Start ``argv`` as child ``name`` in its own session, and follow it.

        Parameters
        ----------
        name : str
            Key of the child in :attr:`children`.
        argv : sequence of str
            The command.
        env : Mapping[str, str], optional
            Variables to add to this process's environment (see :meth:`env`).
        stdout : file or int, optional
            Where its stdout and stderr go (default: ours).
        cwd : str or Path, optional
            Its working directory.

        Returns
        -------
        subprocess.Popen
            The child.

        """
        proc = subprocess.Popen(  # noqa: S603 - argv built by fedcore
            list(argv),
            env=self.env({**os.environ, **(env or {})}),
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
            preexec_fn=_parent_death_signal(),
        )
        self.children[name] = proc
        try:
            self.add_root(proc.pid)
        except psutil.NoSuchProcess:  # already gone: nothing to follow
            pass
        return proc

    # -- membership -----------------------------------------------------------
    def add_root(self, pid: int) -> None:
        """Follow ``pid`` and its descendants."""
        with self._lock:
            proc = psutil.Process(pid)
            self._roots.append(proc)
            self._remember(proc)

    def _remember(self, proc: psutil.Process) -> None:
        try:
            key = (proc.pid, proc.create_time())
            if key not in self._seen:
                self._seen[key] = proc
                self._names[key] = " ".join(proc.cmdline()[:3]) or proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass

    def _alive(self) -> list[psutil.Process]:
        """Every known process still running, after adding the roots' current descendants."""
        for root in list(self._roots):
            try:
                for child in root.children(recursive=True):
                    self._remember(child)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        alive = []
        for proc in self._seen.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        return alive

    def marked(self) -> list[psutil.Process]:
        """Find running processes whose environment carries this tree's marker."""
        found = []
        me = os.getpid()
        for proc in psutil.process_iter(["pid"]):
            if proc.pid == me:
                continue
            try:
                if proc.environ().get(self.marker_variable) == "1" and (
                    proc.status() != psutil.STATUS_ZOMBIE
                ):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def seen(self) -> list[SeenProcess]:
        """Every process ever seen in the tree (after one more look for new ones)."""
        with self._lock:
            self._alive()
            return [SeenProcess(pid, ctime, name) for (pid, ctime), name in self._names.items()]

    # -- memory ---------------------------------------------------------------
    def sample(self) -> MemorySample:
        """Sum RSS (and PSS) over the live tree now; updates :attr:`peak`."""
        with self._lock:
            procs = self._alive()
            rss = pss = n = 0
            detail = []
            for proc in procs:
                try:
                    if self.with_pss:
                        info = proc.memory_full_info()
                        p_rss, p_pss = info.rss, info.pss
                    else:
                        p_rss, p_pss = proc.memory_info().rss, 0
                    name = self._names.get((proc.pid, proc.create_time()), str(proc.pid))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss, pss, n = rss + p_rss, pss + p_pss, n + 1
                detail.append((name, p_rss, p_pss))
            now = MemorySample(n, rss, pss)
            if rss > self.peak.rss:
                self.peak_detail = sorted(detail, key=lambda d: -d[1])
            self.samples += 1
            self.peak = MemorySample(
                max(self.peak.processes, n), max(self.peak.rss, rss), max(self.peak.pss, pss)
            )
            return now

    def start_sampling(self) -> None:
        """Sample in a background thread until :meth:`stop_sampling`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.sample_interval)

        self._thread = threading.Thread(target=loop, name="fedcore-tree-sampler", daemon=True)
        self._thread.start()

    def stop_sampling(self) -> MemorySample:
        """Stop the sampler (one last sample first); return the peak."""
        if self._thread is not None:
            self.sample()
            self._stop.set()
            self._thread.join()
            self._thread = None
        return self.peak

    # -- cleanup --------------------------------------------------------------
    def survivors(self) -> list[psutil.Process]:
        """List the processes of this tree still running (followed or marked)."""
        with self._lock:
            procs = {(p.pid, _ctime(p)): p for p in self._alive()}
        for proc in self.marked():
            procs.setdefault((proc.pid, _ctime(proc)), proc)
        return [p for key, p in procs.items() if key[1] is not None]

    def wait_gone(self, timeout: float) -> list[psutil.Process]:
        """Wait up to ``timeout`` s for every process of the tree to exit; return the rest."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.survivors()
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.1)

    def kill_survivors(self, grace: float = 5.0) -> list[str]:
        """SIGTERM, then SIGKILL after ``grace`` s, every survivor; return what was running."""
        left = self.survivors()
        described = [_describe(p) for p in left]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in left:
                try:
                    proc.send_signal(sig)
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    pass
            _, left = psutil.wait_procs(left, timeout=grace)
            if not left:
                break
        return described

    def stop_all(self, grace: float = 5.0) -> list[str]:
        """Stop every child and every other process of the tree; return the strays killed.

        SIGTERM each child's process group, SIGKILL what is left after ``grace``
        seconds, then SIGTERM (and after a second SIGKILL) every process of the
        tree still running: descendants in sessions of their own, marked strays.
        """
        live = list(self.children.values())
        for proc in live:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in live:
            _signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
        return self.kill_survivors(grace=1.0)

    def __enter__(self) -> ProcessTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Send ``sig`` to ``proc``'s process group (ignored once it is gone)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _ctime(proc: psutil.Process) -> float | None:
    try:
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline()[:3])}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return str(proc.pid)
