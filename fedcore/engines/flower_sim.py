"""Flower's simulation engine (Ray) through ``flwr run``: isolated, offline, no leftovers.

``flwr run .`` on Flower 1.42's default ``:local:`` connection starts a detached
``flower-superlink --simulation`` that outlives the command (it keeps its ports
and its SuperExec running until someone kills it), reads and writes ``~/.flwr``,
and by default installs the app's dependencies with ``uv`` for every run.
:func:`run_flower_simulation` runs the very same ``flwr run <app>`` command, but

- in a private ``FLWR_HOME`` (a temporary directory unless one is given), so no
  configuration, app cache or SuperLink state from the user's home is read;
- with the local SuperLink started here, by the command Flower's own
  ``flwr/cli/local_superlink.py`` uses, on free loopback ports
  (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT`` point
  ``flwr run`` at it, so it does not start another);
- with runtime dependency installation, telemetry, update checks and Ray's usage
  statistics off, so it needs no network;
- and afterwards stops the SuperLink (which stops its SuperExec and the
  simulation process, which shuts Ray down), waits until every process the run
  started has exited, and kills any that did not (reported in ``leftovers``).

The apps (``server/app.py``, ``clients/app.py``) are unchanged: Flower fuses
``[tool.flwr.app.config]`` with ``run_config`` into the flat run config, and gives
each virtual SuperNode ``partition-id``/``num-partitions`` in its node config.

Scale-out: with ``ray_address`` the same run joins a running Ray cluster (Flower's
Ray backend reads ``RAY_ADDRESS``) instead of starting a single-node Ray;
:class:`RayCluster` starts one on this machine, a head and worker nodes, each a
``ray start --block`` of its own (docs/engines.md, "A multi-node Ray cluster").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedcore.core.config import Scalar
from fedcore.core.errors import EngineError
from fedcore.engines.processes import MemorySample, ProcessTree, SeenProcess, free_port

__all__ = ["FlowerRun", "RayCluster", "RayNode", "flower_env", "run_flower_simulation"]

COMPLETED = "finished:completed"


@dataclass(frozen=True)
class FlowerRun:
    """What :func:`run_flower_simulation` observed.

    Attributes
    ----------
    run_id : int
        Flower's run id.
    status : str
        Flower's final run status, ``"finished:completed"`` on success.
    seconds : float
        Wall time from starting the SuperLink until ``flwr run`` returned.
    output : str
        ``flwr run --stream`` output: the run's own log lines.
    processes : tuple[SeenProcess, ...]
        Every process seen in the run's tree: pid, start time, command line.
    leftovers : tuple[str, ...]
        Processes still running after the SuperLink was stopped, which had to be
        killed (empty when Flower shut down cleanly).
    peak : MemorySample
        Peak memory summed over the whole tree (``pss`` is 0 unless ``sample=True``).

    """

    run_id: int
    status: str
    seconds: float
    output: str
    processes: tuple[SeenProcess, ...]
    leftovers: tuple[str, ...]
    peak: MemorySample

    @property
    def completed(self) -> bool:
        """True when Flower reports the run finished and completed."""
        return self.status == COMPLETED


def flower_env(
    flwr_home: str | Path,
    *,
    ray_tmpdir: str | Path,
    http_port: int,
    control_port: int,
    base: Mapping[str, str],
) -> dict[str, str]:
    """Build the environment every Flower process of an isolated, offline run gets."""
    env = dict(base)
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
        # Ray's session files and sockets in a private directory, not a shared /tmp/ray
        # (kept apart from FLWR_HOME: Unix socket paths must stay under 108 bytes).
        RAY_TMPDIR=str(ray_tmpdir),
        # Ray binds its services to loopback instead of the machine's address
        # (ray/_private/services.py get_node_ip_address: "clusters" off -> 127.0.0.1).
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PATH=os.pathsep.join([bin_dir, env.get("PATH", "")]),
    )
    return env


def _toml_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _write_overrides(path: Path, run_config: Mapping[str, Scalar]) -> None:
    # Dotted keys at the top level: Flower flattens them back to "section.key".
    lines = []
    for key, value in run_config.items():
        dotted = ".".join(
            part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
            for part in key.split(".")
        )
        lines.append(f"{dotted} = {_toml_value(value)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineError(
                f"flower-superlink exited with code {process.returncode} while starting; see {log}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise EngineError(
        f"flower-superlink did not answer on 127.0.0.1:{port} within {timeout:.0f} s; see {log}"
    )


def _run_status(env: Mapping[str, str], cwd: Path, run_id: int) -> str:
    out = subprocess.run(
        ["flwr", "ls", "--run-id", str(run_id), "--format", "json"],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        payload = json.loads(out.stdout[out.stdout.index("{") :])
        return str(payload["runs"][0]["status"])
    except (ValueError, KeyError, IndexError):
        return f"unknown (flwr ls exited {out.returncode}: {out.stdout[-300:]} {out.stderr[-300:]})"


def run_flower_simulation(
    app_dir: str | Path = ".",
    *,
    run_config: Mapping[str, Scalar] | None = None,
    num_supernodes: int | None = None,
    client_cpus: int = 1,
    timeout: float = 900.0,
    flwr_home: str | Path | None = None,
    sample: bool = False,
    sample_interval: float = 0.2,
    ray_address: str | None = None,
) -> FlowerRun:
    """Run the Flower App in ``app_dir`` on Flower's Ray simulation engine.

    Parameters
    ----------
    app_dir : str or Path (default: ".")
        Directory with the app's ``pyproject.toml``.
    run_config : Mapping[str, Scalar], optional
        Flat overrides of ``[tool.flwr.app.config]``, e.g. ``{"run.rounds": 2}``.
        Every key must exist there (Flower refuses unknown keys).
    num_supernodes : int, optional
        Virtual SuperNodes; default ``run_config["run.clients"]``, else 10.
    client_cpus : int (default: 1)
        CPUs Ray reserves per ClientApp (Flower's default is 2).
    timeout : float (default: 900.0)
        Seconds to wait for the run; on expiry everything is stopped and
        :class:`~fedcore.core.errors.EngineError` is raised.
    flwr_home : str or Path, optional
        Flower's home directory for this run; default a fresh temporary one,
        removed afterwards.
    sample : bool (default: False)
        Also sample PSS (see :class:`~fedcore.engines.processes.MemorySample`);
        summed RSS is always sampled.
    sample_interval : float (default: 0.2)
        Seconds between looks at the process tree (memory, new processes).
    ray_address : str, optional
        ``HOST:PORT`` of a running Ray cluster's head (e.g. :attr:`RayCluster.address`)
        to run the ClientApps on, instead of the single-node Ray that Flower starts.
        It reaches Flower's Ray backend as ``RAY_ADDRESS`` (its ``ray.init()`` takes
        no address argument and reads that variable).

    Returns
    -------
    FlowerRun
        Run id, final status, wall time, log, processes and peak memory.

    """
    app = Path(app_dir).resolve()
    overrides = dict(run_config or {})
    n_nodes = num_supernodes or int(overrides.get("run.clients", 10))
    tmp = None
    if flwr_home is None:
        tmp = tempfile.mkdtemp(prefix="fedcore-flwr-home-")
        home = Path(tmp)
    else:
        home = Path(flwr_home).resolve()
        home.mkdir(parents=True, exist_ok=True)
    ray_tmpdir = tempfile.mkdtemp(prefix="fcray-")
    # The sampler also keeps following the tree, so short-lived processes are seen too.
    tree = ProcessTree(sample_interval=sample_interval, pss=sample)
    http_port, control_port = free_port(), free_port()
    env = tree.env(
        flower_env(
            home,
            ray_tmpdir=ray_tmpdir,
            http_port=http_port,
            control_port=control_port,
            base=os.environ,
        )
    )
    if ray_address is not None:
        # Inherited by SuperLink -> SuperExec -> flwr-simulation, whose RayBackend calls
        # ray.init() without an address: Ray then joins this cluster as a driver.
        env["RAY_ADDRESS"] = ray_address
    overrides_file = home / "run-config.toml"
    _write_overrides(overrides_file, overrides)
    link_log = home / "local-superlink" / "superlink.log"
    link_log.parent.mkdir(parents=True, exist_ok=True)
    cli_log = home / "flwr-run.log"

    superlink: subprocess.Popen[bytes] | None = None
    output = ""
    run_id = 0
    t0 = time.perf_counter()
    try:
        tree.start_sampling()
        # The command flwr/cli/local_superlink.py runs, on our ports, in-memory state.
        superlink = tree.start(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                "--control-api-address",
                f"127.0.0.1:{control_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(http_port),
                "--log-file",
                str(link_log),
            ],
            env=env,
            cwd=app,
            stdout=subprocess.DEVNULL,
        )
        _wait_healthy(http_port, superlink, 60.0, link_log)

        federation = f"num-supernodes={n_nodes} client-resources-num-cpus={client_cpus}"
        with cli_log.open("wb") as sink:
            cli = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [
                    "flwr",
                    "run",
                    str(app),
                    "--stream",
                    "--run-config",
                    str(overrides_file),
                    "--federation-config",
                    federation,
                ],
                env=env,
                cwd=app,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
            tree.add_root(cli.pid)
            try:
                cli.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                cli.kill()
                cli.wait()
                raise EngineError(
                    f"`flwr run` did not finish within {timeout:.0f} s; log: {cli_log}"
                ) from None
        seconds = time.perf_counter() - t0
        output = cli_log.read_text(encoding="utf-8", errors="replace")
        match = re.search(r"Successfully started run (\d+)", output)
        if cli.returncode != 0 or match is None:
            raise EngineError(
                f"`flwr run` exited with code {cli.returncode} without starting a run:\n"
                f"{output[-2000:]}"
            )
        run_id = int(match.group(1))
        status = _run_status(env, app, run_id)
    finally:
        leftovers = _shutdown(superlink, tree)
        peak = tree.stop_sampling()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return FlowerRun(
        run_id=run_id,
        status=status,
        seconds=seconds,
        output=output,
        processes=tuple(tree.seen()),
        leftovers=tuple(leftovers),
        peak=peak,
    )


def _shutdown(superlink: subprocess.Popen[bytes] | None, tree: ProcessTree) -> list[str]:
    """Stop the SuperLink gracefully, then make sure nothing of the run is left."""
    if superlink is not None and superlink.poll() is None:
        superlink.send_signal(signal.SIGTERM)
        try:
            superlink.wait(timeout=30)
        except subprocess.TimeoutExpired:
            superlink.kill()
            superlink.wait()
    if not tree.wait_gone(timeout=30):
        return []
    return tree.kill_survivors()


# -- a multi-node Ray cluster on this machine ------------------------------------------

#: Ray's header line in each worker's ``worker-*.out`` log naming the actor it hosts.
_ACTOR_HEADER = ":actor_name:"


@dataclass(frozen=True)
class RayNode:
    """One node of a :class:`RayCluster`: a ``ray start --block`` with its own address.

    Attributes
    ----------
    name : str
        ``"head"`` or ``"worker-<i>"``.
    ip : str
        The node's own loopback address (``127.0.0.2`` for the head, then ``.3``, ...).
    temp_dir : Path
        The node's ``--temp-dir``: its session, sockets and logs, apart from every
        other node's.

    """

    name: str
    ip: str
    temp_dir: Path

    def actors(self, class_name: str = "ClientAppActor") -> int:
        """Count the actors of ``class_name`` that ran on this node (from its worker logs).

        Every worker process a node's raylet starts logs to
        ``<temp_dir>/session_<time>/logs/worker-<id>-<job>-<pid>.out`` (``session_latest``
        links to it and is skipped), whose first lines name the actor it hosts
        (``:actor_name:ClientAppActor``); only this node's workers write into its temp dir.
        """
        count = 0
        sessions = [d for d in self.temp_dir.glob("session_*") if not d.is_symlink()]
        for log in (log for d in sessions for log in d.glob("logs/worker-*.out")):
            with log.open("r", encoding="utf-8", errors="replace") as f:
                head = [f.readline() for _ in range(3)]
            if f"{_ACTOR_HEADER}{class_name}\n" in head:
                count += 1
        return count


class RayCluster:
    """A Ray cluster on this machine: a head node and worker nodes, started with ``ray start``.

    Each node is one ``ray start --block`` child (its raylet, object store and agents
    below it) with its own loopback address, free ports and ``--temp-dir``, so a
    cluster run here is a real multi-node one (two raylets, a GCS they register
    with, actors placed by Ray's scheduler) that shares nothing with another Ray on
    the machine. ``ray stop`` is never used (it stops every Ray on the machine):
    :meth:`stop` sends SIGTERM to each node's ``ray start --block`` (which stops the
    processes it started), workers first, then kills whatever of the cluster is left.

    The nodes bind to ``127.0.0.2``, ``127.0.0.3``, ... and not ``127.0.0.1``: a worker
    node needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``, under which Ray rewrites
    ``127.0.0.1``/``localhost`` in an address to the machine's network address
    (``ray._private.services.resolve_ip_for_localhost``), where nothing listens;
    other loopback addresses are kept as given. Nothing listens beyond loopback.

    Use as a context manager::

        with RayCluster(workers=1, cpus_per_node=1) as cluster:
            run_flower_simulation(".", ray_address=cluster.address, num_supernodes=4)
            print({node.name: node.actors() for node in cluster.nodes})

    Parameters
    ----------
    workers : int (default: 1)
        Worker nodes besides the head.
    cpus_per_node : int (default: 1)
        ``--num-cpus`` of each node: with ``client-resources-num-cpus=1`` each node
        runs that many ClientApps at a time.
    temp_root : str or Path, optional
        Directory for the nodes' temp dirs and ``ray start`` logs; default a fresh
        short one under the system temp dir (Ray's Unix socket paths must stay
        under 108 bytes), removed by :meth:`stop`.
    start_timeout : float (default: 180.0)
        Seconds each node may take to start.

    """

    def __init__(
        self,
        *,
        workers: int = 1,
        cpus_per_node: int = 1,
        temp_root: str | Path | None = None,
        start_timeout: float = 180.0,
    ) -> None:
        if workers < 0 or workers > 200:
            raise EngineError(f"RayCluster(workers={workers}): use 0 to 200 worker nodes")
        if cpus_per_node < 1:
            raise EngineError(f"RayCluster(cpus_per_node={cpus_per_node}): use at least 1")
        self._own_root = temp_root is None
        root = Path(tempfile.mkdtemp(prefix="fcrc-")) if temp_root is None else Path(temp_root)
        self.root = root.resolve()
        self.cpus_per_node = cpus_per_node
        self.start_timeout = start_timeout
        self.nodes = tuple(
            RayNode(
                name="head" if i == 0 else f"worker-{i}",
                ip=f"127.0.0.{2 + i}",
                temp_dir=self.root / ("head" if i == 0 else f"worker-{i}"),
            )
            for i in range(1 + workers)
        )
        head = self.nodes[0]
        #: ``HOST:PORT`` of the head's GCS: ``ray start --address``, ``RAY_ADDRESS``.
        self.address = f"{head.ip}:{free_port(head.ip)}"
        #: Every process of the cluster's nodes (followed from each ``ray start``).
        self.tree = ProcessTree(sample_interval=0.5, pss=False)
        self._procs: list[subprocess.Popen[bytes]] = []

    def _argv(self, node: RayNode) -> list[str]:
        ip = node.ip

        def port() -> str:
            return str(free_port(ip))

        argv = [
            "ray",
            "start",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address",
            ip,
            "--num-cpus",
            str(self.cpus_per_node),
            "--temp-dir",
            str(node.temp_dir),
            # Every port Ray would otherwise take at a fixed default (two nodes on one
            # machine, or another Ray here, would collide): a free one on this address.
            "--node-manager-port",
            port(),
            "--object-manager-port",
            port(),
            "--dashboard-agent-listen-port",
            port(),
            "--dashboard-agent-grpc-port",
            port(),
            "--runtime-env-agent-port",
            port(),
            "--metrics-export-port",
            port(),
        ]
        if node is self.nodes[0]:
            gcs_port = self.address.rsplit(":", 1)[1]
            argv += ["--head", "--port", gcs_port, "--include-dashboard", "false"]
            argv += ["--ray-client-server-port", port()]
        else:
            argv += ["--address", self.address]
        return argv

    def _log(self, node: RayNode) -> Path:
        return self.root / f"{node.name}.log"

    def start(self) -> RayCluster:
        """Start the head, then each worker node; return when all have joined."""
        env = {
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # lets `ray start --address` run
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        }
        try:
            self.tree.start_sampling()  # follows each node's descendants: raylets, actors
            for node in self.nodes:
                node.temp_dir.mkdir(parents=True, exist_ok=True)
                with self._log(node).open("wb") as log:
                    self._procs.append(
                        self.tree.start(node.name, self._argv(node), env=env, stdout=log)
                    )
                if node is self.nodes[0]:
                    # The workers need only the head's GCS, which is up seconds before
                    # the head's raylet and agents: they start meanwhile.
                    self._wait_gcs(self._procs[0])
            for node, proc in zip(self.nodes, self._procs, strict=True):
                self._wait_started(node, proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_gcs(self, head: subprocess.Popen[bytes]) -> None:
        host, port = self.address.rsplit(":", 1)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and head.poll() is None:
            try:
                socket.create_connection((host, int(port)), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        self._wait_started(self.nodes[0], head)  # names the failure (exit code, log)

    def _wait_started(self, node: RayNode, proc: subprocess.Popen[bytes]) -> None:
        # `ray start` prints this once the node's raylet has registered with the GCS.
        log = self._log(node)
        deadline = time.monotonic() + self.start_timeout
        while b"Ray runtime started." not in log.read_bytes():
            if proc.poll() is not None:
                raise EngineError(
                    f"`ray start` of the {node.name} node exited with code {proc.returncode}:"
                    f"\n{log.read_text(errors='replace')[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise EngineError(
                    f"the {node.name} node did not start within {self.start_timeout:.0f} s"
                    f" (RayCluster(start_timeout=...)); see {log}"
                )
            time.sleep(0.2)

    def stop(self) -> list[str]:
        """Stop every node (workers first, then the head); return the processes killed.

        Empty when each ``ray start --block`` stopped its node's processes on SIGTERM.
        """
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
        self._procs.clear()
        killed = self.tree.kill_survivors() if self.tree.wait_gone(timeout=20) else []
        self.tree.stop_sampling()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        return killed

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
