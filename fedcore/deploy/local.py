"""``fedcore deploy-local``: a throwaway federation on this machine, one process per party.

::

    fedcore deploy-local --clients 3 [--rounds 5] [--out RUN_DIR] [--set KEY=VALUE ...] [CONFIG]

0. checks the config before starting anything, as ``fedcore simulate`` does: its
   data, model, loops and strategy, with import paths resolved beside the config
   file and in the working directory (the same ``PYTHONPATH`` reaches every process
   it starts, so the server and the clients import the same user modules);
1. provisions a federation into a temporary directory (CA, server certificate
   for ``localhost``/``127.0.0.1``, one identity kit per client);
2. carves the config's dataset the way ``fedcore simulate`` partitions it and
   writes one ``.npz`` per client (the server keeps the held-out test split);
3. starts ``fedcore server`` and N ``fedcore client`` processes on loopback, over
   TLS with node authentication; each client reads the same config as its own
   (``fedcore client --config``: one user owns every party here);
4. trains into the run directory (the same files as ``fedcore simulate``);
5. stops every process it started, whatever happens (end of run, a failed
   process, Ctrl-C, SIGTERM), and removes the temporary federation (kept, with
   the client logs, when a process failed, or with ``--keep``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.core.config import Config, to_toml
from fedcore.core.errors import DataError, DeploymentError
from fedcore.engines.processes import ProcessTree, free_port, install_signal_handlers

__all__ = ["carve", "deploy_local", "register"]


def carve(cfg: Config, out: Path) -> list[Path]:
    """Write client ``i``'s share of the dataset to ``out/client-{i+1}.npz``; the paths.

    The shares are the ones ``fedcore simulate`` gives its virtual clients (same
    seed, same partitioner); each client splits its own file into local train
    and validation parts.
    """
    from fedcore.clientside.data import simulation_split

    split = simulation_split(cfg.data, seed=cfg.run.seed, num_clients=cfg.run.clients)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, idx in enumerate(split.parts):
        if len(idx) == 0:
            raise DataError(
                f"client {i + 1} of {cfg.run.clients} gets no examples under "
                f"data.partition = {cfg.data.partition!r}; use fewer clients or another partition"
            )
        part = split.train.subset(idx)
        path = out / f"client-{i + 1}.npz"
        np.savez(path, x=part.x, y=part.y)
        paths.append(path)
    return paths


def _deploy_config(cfg: Config, clients: int, rounds: int | None, run_dir: Path) -> Config:
    from fedcore.clientside.data import holdout

    s = cfg.strategy
    cfg = cfg.replace(
        run={"clients": clients, **({"rounds": rounds} if rounds is not None else {})},
        strategy={
            "min-train-clients": min(s.min_train_clients, clients),
            "min-evaluate-clients": min(s.min_evaluate_clients, clients),
        },
        round={"min-available-clients": clients},
        deploy={"run-dir": str(run_dir)},
    )
    if cfg.data.num_classes == 0:  # a client's file may lack a class: fix the count for all
        _, test = holdout(cfg.data, seed=cfg.run.seed)
        cfg = cfg.replace(data={"num-classes": test.num_classes})
    return cfg


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def deploy_local(
    cfg: Config,
    *,
    clients: int,
    rounds: int | None = None,
    run_dir: Path,
    keep: bool = False,
    poll_min: float = 0.02,
    client_timeout: float = 120.0,
    quiet: bool = False,
) -> int:
    """Run the federation described in the module docstring; the server's exit code.

    ``quiet``: the server prints no line per round.
    """
    from fedcore.deploy.provision import provision
    from fedcore.serverside.checkpoint import never_trained

    if clients < 1:
        raise DeploymentError(f"--clients {clients}: must be >= 1 (one process per client)")
    run_dir = run_dir.resolve()
    if run_dir.exists() and any(run_dir.iterdir()) and not never_trained(run_dir):
        raise DeploymentError(
            f"run directory {run_dir} exists and is not empty; choose another --out"
        )
    cfg = _deploy_config(cfg, clients, rounds, run_dir)
    tmp = Path(tempfile.mkdtemp(prefix="fedcore-deploy-local-"))
    ok = False
    interrupted = False
    t0 = time.perf_counter()
    try:
        fed = provision(tmp / "federation", clients=clients)
        data = carve(cfg, tmp / "data")
        config_path = tmp / "config.toml"
        config_path.write_text(to_toml(cfg))
        port, local_port = free_port(), free_port()
        address = f"127.0.0.1:{port}"
        logs = tmp / "logs"
        logs.mkdir()
        print(
            f"fedcore deploy-local: {clients} clients, {cfg.run.rounds} rounds; federation, data "
            f"and logs in {tmp}",
            flush=True,
        )
        cli = [sys.executable, "-m", "fedcore.cli"]
        with ProcessTree() as tree:
            server = tree.start(
                "server",
                [
                    *cli,
                    "server",
                    "--kit",
                    str(fed.server_kit),
                    "--address",
                    address,
                    "--local-port",
                    str(local_port),
                    "--state-dir",
                    str(tmp / "server-state"),
                    *(["--quiet"] if quiet else []),
                    str(config_path),
                ],
            )
            client_procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
            for i, path in enumerate(data):
                name = f"client-{i + 1}"
                log_path = logs / f"{name}.log"
                with open(log_path, "wb") as log_file:
                    proc = tree.start(
                        name,
                        [
                            *cli,
                            "client",
                            "--kit",
                            str(fed.client_kit(name)),
                            "--server",
                            address,
                            "--data",
                            str(path),
                            "--config",
                            str(config_path),
                            "--once",
                            "--connect-timeout",
                            str(client_timeout),
                            "--poll-min",
                            str(poll_min),
                        ],
                        stdout=log_file,
                    )
                client_procs[name] = (proc, log_path)
            while server.poll() is None:
                for name, (proc, log_path) in client_procs.items():
                    if proc.poll() not in (None, 0):
                        raise DeploymentError(
                            f"{name} exited with code {proc.returncode}:\n{_tail(log_path)}"
                        )
                time.sleep(0.2)
            # clients end with a completed run; after a failed one they are stopped at once
            deadline = time.monotonic() + (20 if server.returncode == 0 else 0)
            for _name, (proc, _) in client_procs.items():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass  # stopped below with everything else
            rc = server.returncode
        ok = rc == 0
        print(
            f"fedcore deploy-local: {'done' if ok else 'FAILED'} in "
            f"{time.perf_counter() - t0:.1f} s; run directory {run_dir}",
            flush=True,
        )
        return int(rc)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if (ok or interrupted) and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"fedcore deploy-local: kept {tmp} (federation, data, client logs)", flush=True)


def cmd_deploy_local(args: argparse.Namespace) -> int:
    """``fedcore deploy-local``."""
    from fedcore.core.overrides import apply_sets
    from fedcore.runtime.configfile import default_config_path, importable
    from fedcore.runtime.preflight import preflight
    from fedcore.serverside.rundir import default_run_dir
    from fedcore.storage.configfile import load_config

    install_signal_handlers()
    path = Path(args.config) if args.config else default_config_path()
    importable(path)  # here and, through PYTHONPATH, in every process started below
    cfg = apply_sets(load_config(path), args.set or [])
    # the config as the server and the clients will see it, checked before any process starts
    preflight(_deploy_config(cfg, args.clients, args.rounds, Path("unused")), config_path=path)
    run_dir = Path(args.out) if args.out else default_run_dir(cfg)
    return deploy_local(
        cfg,
        clients=args.clients,
        rounds=args.rounds,
        run_dir=run_dir,
        keep=args.keep,
        quiet=args.quiet,
    )


#: ``fedcore deploy-local --help``'s examples.
EPILOG = """\
examples:
  fedcore deploy-local --clients 3 --rounds 3
  fedcore deploy-local my/config.toml --clients 4 --out runs/local-1
  fedcore deploy-local --clients 3 --set secagg.enabled=false --set train.lr=0.05 --quiet
"""


def register(subparsers: Any) -> None:
    """Add the ``deploy-local`` sub-command."""
    from fedcore.core.overrides import SET_HELP

    p = subparsers.add_parser(
        "deploy-local",
        help="a throwaway TLS federation on this machine: server + N client processes",
        description="Provision a temporary federation, give each client its own data file, "
        "run `fedcore server` and N `fedcore client` processes on loopback over TLS, "
        "train into the run directory and stop every process.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", help="TOML config (default: simulations/default.toml)")
    p.add_argument("--clients", type=int, required=True, help="number of client processes")
    p.add_argument("--rounds", type=int, help="override run.rounds")
    p.add_argument("--out", help="run directory to create (default: <run.out-dir>/<timestamp>)")
    p.add_argument("--keep", action="store_true", help="keep the temporary federation and logs")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    p.add_argument("--quiet", action="store_true", help="no line per round from the server")
    p.set_defaults(func=cmd_deploy_local)
