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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
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

__all__ = ["FlowerRun", "flower_env", "run_flower_simulation"]

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
