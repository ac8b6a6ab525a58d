"""Track every process an engine starts: memory summed over the tree, and cleanup.

A :class:`ProcessTree` follows one or more root processes and all their
descendants, including detached ones (``start_new_session``) as long as they are
seen while their parent lives. Every process started with :meth:`ProcessTree.env`
also carries a unique marker in its environment, so a descendant that was
re-parented before it was seen is still found (and only ours are: the marker is
a fresh random token).

Used by :mod:`fedcore.engines.flower_sim` to leave no process behind, and by the
benchmarks to measure peak memory summed over all processes of a run.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

__all__ = ["MemorySample", "ProcessTree", "SeenProcess"]

MARKER_VARIABLE = "FEDCORE_PROCESS_TREE"


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
    """The processes started from a set of roots, with memory sampling and cleanup.

    Parameters
    ----------
    sample_interval : float (default: 0.2)
        Seconds between samples of the background sampler (:meth:`start_sampling`).
    pss : bool (default: True)
        Also read each process's PSS (``/proc/<pid>/smaps_rollup``; Linux).

    """

    def __init__(self, *, sample_interval: float = 0.2, pss: bool = True) -> None:
        self.marker = secrets.token_hex(8)
        self.sample_interval = sample_interval
        self.with_pss = pss
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

    # -- membership -----------------------------------------------------------
    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return ``base`` (default ``os.environ``) plus this tree's marker, for ``Popen``."""
        env = dict(os.environ if base is None else base)
        env[MARKER_VARIABLE] = self.marker
        return env

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
                if proc.environ().get(MARKER_VARIABLE) == self.marker and (
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
