"""The ``fedcore`` command line.

::

    fedcore                  (help)
    fedcore --version
    fedcore simulate [CONFIG] [--out DIR] [--rounds N] [--clients N] [--seed S] [--workers W]
                     [--set KEY=VALUE ...] [--quiet]
    fedcore simulate --resume RUN_DIR [--rounds N]
    fedcore provision | server | client | deploy-local ...   (``fedcore CMD --help``)

Exit codes: 0 success, 2 a configuration, data or checkpoint error (the message
names the key or file, the value and what is allowed), 1 anything else, 130
interrupted (Ctrl-C); ``fedcore client`` also 3 when the server refuses it (identity
not admitted, TLS, or its kit already connected from another process).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from fedcore.core.config import Config, to_flat, to_toml
from fedcore.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FedcoreError,
    RoundFailedError,
)
from fedcore.core.overrides import SET_HELP, apply_sets
from fedcore.runtime.configfile import default_config_path, importable, load_client_app
from fedcore.runtime.preflight import preflight
from fedcore.storage.configfile import load_config

__all__ = ["main", "preflight", "version_line"]


def version_line() -> str:
    """``fedcore 0.1.0 (Flower 1.42.0, torch 2.13.0, Python 3.11.9)``, without importing torch."""
    from importlib.metadata import PackageNotFoundError, version

    from fedcore import __version__

    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    python = ".".join(str(n) for n in sys.version_info[:3])
    return (
        f"fedcore {__version__} (Flower {installed('flwr')}, torch {installed('torch')}, "
        f"Python {python})"
    )


def _apply_overrides(cfg: Config, args: argparse.Namespace) -> Config:
    run: dict[str, int] = {}
    if args.rounds is not None:
        run["rounds"] = args.rounds
    if args.clients is not None:
        run["clients"] = args.clients
    if args.seed is not None:
        run["seed"] = args.seed
    sections: dict[str, dict[str, int]] = {"run": run} if run else {}
    if args.workers is not None:
        sections["engine"] = {"workers": args.workers}
    # --set first, the named flags (--rounds, ...) on top; all applied and validated at once
    return apply_sets(cfg, args.set or [], sections)


def centralized_baseline(cfg: Config) -> dict[str, float]:
    """The same model trained centrally on the union of the clients' training data.

    Same initial weights and optimizer settings, ``run.baseline-epochs`` epochs over
    the union of the clients' local training parts; evaluated on the same held-out
    test set as the federated model.
    """
    import numpy as np
    import torch

    from fedcore.clientside.data import Dataset, client_data, holdout
    from fedcore.clientside.training import TrainSettings, evaluate, make_loader, train
    from fedcore.core.seeds import derive_seed
    from fedcore.runtime.serve import initial_model

    _, test = holdout(cfg.data, seed=cfg.run.seed)
    parts = [
        client_data(cfg.data, seed=cfg.run.seed, partition_id=i, num_partitions=cfg.run.clients)
        for i in range(cfg.run.clients)
    ]
    union = Dataset(
        np.concatenate([p.train.x for p in parts]),
        np.concatenate([p.train.y for p in parts]),
        test.num_classes,
    )
    model = initial_model(cfg, test)
    seed = derive_seed(cfg.run.seed, "baseline")
    settings = TrainSettings.from_config(cfg.train, seed=seed)
    settings = TrainSettings(**{**settings.__dict__, "epochs": cfg.run.baseline_epochs})
    torch.manual_seed(seed)
    train(
        model, make_loader(union, batch_size=settings.batch_size, shuffle=True, seed=seed), settings
    )
    return evaluate(model, make_loader(test, batch_size=512, shuffle=False))


def cmd_simulate(args: argparse.Namespace) -> int:
    """``fedcore simulate``."""
    from fedcore.engines.embedded import run_embedded
    from fedcore.serverside.rundir import redraw_plot
    from fedcore.storage.files import atomic_write, write_json

    t0 = time.perf_counter()
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir is not None:
        if args.out:
            raise ConfigError("--out", args.out, "cannot be combined with --resume RUN_DIR")
        if not (resume_dir / "config.toml").is_file():
            raise CheckpointError(f"{resume_dir} is not a fedcore run directory (no config.toml)")
    if args.config:
        path: Path | None = Path(args.config)
    elif resume_dir is not None:
        path = resume_dir / "config.toml"
    else:
        path = default_config_path()
    importable(path)
    if args.client_app:  # the user's own ClientApp: checked before any process starts
        load_client_app(args.client_app, flag="--client-app", config_path=path)
    cfg = _apply_overrides(load_config(path), args)
    preflight(cfg, config_path=path, keep_data=True)  # (loaded once, before the fork)
    from fedcore.serverside.checkpoint import has_checkpoint, load_checkpoint, never_trained

    resume = resume_dir is not None
    if resume_dir is not None:
        if has_checkpoint(resume_dir):
            load_checkpoint(resume_dir, expect=cfg)  # refuse a bad checkpoint before starting
        else:
            resume = False
            print(
                f"fedcore simulate: {resume_dir} has no checkpoint (it was stopped before "
                "round 1 completed): starting it from round 1",
                flush=True,
            )
        run_dir = resume_dir
    elif args.out:
        run_dir = Path(args.out)
        if run_dir.exists() and any(run_dir.iterdir()):
            if not never_trained(run_dir):
                raise ConfigError(
                    "--out",
                    str(run_dir),
                    "exists and is not empty; choose a new directory "
                    f"(or continue it: fedcore simulate --resume {run_dir})",
                )
            print(
                f"fedcore simulate: reusing {run_dir}: it holds only what a start interrupted "
                "before round 1 wrote",
                flush=True,
            )
    else:
        from fedcore.serverside.rundir import default_run_dir

        run_dir = default_run_dir(cfg)
    if not args.quiet:
        print(
            f"fedcore simulate: {path or 'built-in defaults'} | {cfg.run.clients} clients, "
            f"{cfg.run.rounds} rounds, {cfg.data.source}/{cfg.data.partition}, "
            f"model {cfg.model.factory}, seed {cfg.run.seed}",
            flush=True,
        )
    from server.app import app as server_app

    # The clients' own config is this resolved one (overrides included): the ServerApp
    # writes the same bytes to the same file when it starts.
    run_dir.mkdir(parents=True, exist_ok=True)
    client_config = run_dir / "config.toml"
    atomic_write(client_config, to_toml(cfg).encode())
    try:
        try:
            run_embedded(
                server_app,
                client_app=args.client_app or "clients.app:app",
                run_config=to_flat(cfg),
                client_config=client_config,
                num_clients=cfg.run.clients,
                workers=cfg.engine.workers,
                server_node_config={
                    "run-dir": str(run_dir),
                    "progress": not args.quiet,
                    "quiet": bool(args.quiet),
                    "resume": resume,
                    # plot.png is drawn below, once the worker processes have stopped:
                    # matplotlib and the drawing add ~28 MiB, which on top of a live
                    # worker was the run's peak memory (measured, issue 11)
                    "plot": False,
                },
                client_state_dir=run_dir / "client-state",
            )
        except RoundFailedError:  # its run directory is complete but for the plot
            redraw_plot(run_dir)
            raise
    except KeyboardInterrupt:  # the grid is closed; say how to go on from the checkpoint
        # --resume reads the run's resolved config (overrides included); the config is
        # named too when it lies outside the working directory, so that its modules
        # (the user's model) stay importable.
        again = ["fedcore", "simulate"]
        if args.config and Path(args.config).resolve().parent != Path.cwd().resolve():
            again.append(str(args.config))
            if getattr(args, "rounds", None):  # (an override the config file lacks)
                again += ["--rounds", str(cfg.run.rounds)]
        again += ["--resume", str(run_dir)]
        print(
            f"\nfedcore: interrupted; to continue this run: {shlex.join(again)}",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        # Exit now: the last round's checkpoint is on disk, and finalizing torch's
        # modules alone takes 1-2 s of the 3 s an interrupt may take.
        os._exit(130)
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    fed_acc = summary["final_test_accuracy"]
    line = f"federated test accuracy {fed_acc:.4f}"
    if cfg.run.centralized_baseline:
        base = centralized_baseline(cfg)
        summary["centralized_baseline"] = {
            "test_accuracy": base["accuracy"],
            "test_loss": base["loss"],
            "epochs": cfg.run.baseline_epochs,
        }
        write_json(run_dir / "summary.json", summary)
        line += (
            f" | centralized baseline (same model and data, {cfg.run.baseline_epochs} epochs) "
            f"{base['accuracy']:.4f}"
        )
    redraw_plot(run_dir)  # (with the baseline, if one was trained: drawn once)
    print(line)
    print(f"wall time {time.perf_counter() - t0:.1f} s")
    print(f"run directory: {run_dir}")
    return 0


#: Modules that add sub-commands: each has ``register(subparsers)`` which adds its
#: parsers and sets ``func`` (a callable taking the parsed args, returning the exit code).
COMMAND_MODULES: tuple[str, ...] = (
    "fedcore.deploy.provision",
    "fedcore.deploy.server",
    "fedcore.deploy.node",
    "fedcore.deploy.local",
)


#: ``fedcore --help``'s closing lines.
MAIN_EPILOG = """\
examples:
  fedcore simulate                                    # digits, 10 clients, 20 rounds
  fedcore simulate --rounds 5 --set train.lr=0.05     # any config key with --set
  fedcore provision --out fed --clients 3 --server-name localhost
  fedcore deploy-local --clients 3 --rounds 3         # server + 3 client processes, TLS

Run `fedcore COMMAND --help` for a command's options and examples.
Exit codes: 0 success, 2 a configuration, data or checkpoint error, 1 anything else
(130 interrupted).
"""

#: ``fedcore simulate --help``'s examples (a test parses each one).
SIMULATE_EPILOG = """\
examples:
  fedcore simulate
  fedcore simulate simulations/shards.toml --rounds 5 --clients 4 --out runs/shards-5
  fedcore simulate --set strategy.name=fedprox --set strategy.options.proximal-mu=0.1 --quiet
  fedcore simulate --resume runs/20261127-112233-seed0 --rounds 30
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="fedcore",
        description="Federated learning on Flower: simulate locally, or deploy a server and "
        "clients over TLS.",
        epilog=MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--version", action="store_true", help="print fedcore's, Flower's and torch's versions"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sim = sub.add_parser(
        "simulate",
        help="run a simulation on the embedded engine",
        description="Train with virtual clients on this machine (fedcore's embedded engine) and "
        "write a run directory: metrics, model, plot, summary.",
        epilog=SIMULATE_EPILOG,
        formatter_class=_Formatter,
    )
    sim.add_argument("config", nargs="?", help="TOML config (default: simulations/default.toml)")
    sim.add_argument("--out", help="run directory to create (default: <run.out-dir>/<timestamp>)")
    sim.add_argument("--rounds", type=int, help="override run.rounds")
    sim.add_argument("--clients", type=int, help="override run.clients")
    sim.add_argument("--seed", type=int, help="override run.seed")
    sim.add_argument("--workers", type=int, help="override engine.workers (0 = one per core)")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    sim.add_argument(
        "--client-app",
        metavar="MODULE:ATTR",
        help="run this Flower ClientApp instead of fedcore's (found beside CONFIG or in the "
        "working directory; it reads [app] keys from context.run_config; see docs/engines.md)",
    )
    sim.add_argument(
        "--quiet", action="store_true", help="no per-round lines: only errors and the final lines"
    )
    sim.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed run from its last completed round (uses RUN_DIR/config.toml "
        "unless CONFIG is given; --rounds may extend it)",
    )
    sim.set_defaults(func=cmd_simulate)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


_SHOWN: set[str] = set()
_exit_hook = False


def _show_warning_once(message: Warning | str, *_: object, **__: object) -> None:
    """Print a warning as ``fedcore: warning: ...``, each text once per process.

    A resumed run reads its config twice (the run directory's and the checkpoint's);
    the user needs each rename notice once.
    """
    text = str(message)
    if text not in _SHOWN:
        _SHOWN.add(text)
        print(f"fedcore: warning: {text}", file=sys.stderr)


def _skip_final_collections() -> None:
    """At exit: freeze every object, so the interpreter's last GC passes skip them.

    Finalizing a process that holds torch spent 0.76 s in the cyclic GC (measured on
    ``fedcore simulate``, 10 clients x 3 rounds: 0.25 s with this). Every file is
    already written and closed (atomically); the atexit handlers still run after
    this one (logging's flush, weakref finalizers); only unreachable cycles are left
    to the operating system.
    """
    gc.freeze()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedcore`` console script."""
    global _exit_hook
    if not _exit_hook:
        _exit_hook = True
        atexit.register(_skip_final_collections)  # (the last handler to register runs first)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Renamed config keys still work; say once which name to use instead (Python hides
    # DeprecationWarning outside __main__ by default).
    warnings.filterwarnings(
        "always", message="config key .* is deprecated", category=DeprecationWarning
    )
    warnings.showwarning = _show_warning_once
    try:
        parser = build_parser()
    except FedcoreError as exc:  # e.g. an unsupported Flower (fedcore.flower_adapter)
        print(f"fedcore: error: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    if args.version:
        print(version_line())
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"fedcore: error: {exc}", file=sys.stderr)
        return 2
    except FedcoreError as exc:
        print(f"fedcore: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
