"""The ``fedcore`` command line.

::

    fedcore simulate [CONFIG] [--out DIR] [--rounds N] [--clients N] [--seed S] [--workers W]
    fedcore simulate --resume RUN_DIR [--rounds N]

Exit codes: 0 success, 2 a configuration, data or checkpoint error (the message
names the key or file, the value and what is allowed), 1 anything else.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from fedcore.core.config import Config, to_flat, to_toml
from fedcore.core.errors import CheckpointError, ConfigError, DataError, FedcoreError
from fedcore.runtime.configfile import default_config_path, importable
from fedcore.storage.configfile import load_config

__all__ = ["main"]


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
    return cfg.replace(**sections) if sections else cfg


def preflight(cfg: Config) -> None:
    """Everything that can be checked before training: strategy, data, partitions, model, loops."""
    from fedcore.clientside.data import simulation_split
    from fedcore.clientside.models import build_model
    from fedcore.clientside.training import resolve_loops
    from fedcore.runtime.serve import build_strategy

    build_strategy(cfg)  # its options, and whether secure aggregation allows it

    split = simulation_split(cfg.data, seed=cfg.run.seed, num_clients=cfg.run.clients)
    build_model(cfg.model, input_shape=split.test.input_shape, num_classes=split.test.num_classes)
    resolve_loops(cfg.model)


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
    cfg = _apply_overrides(load_config(path), args)
    preflight(cfg)
    if resume_dir is not None:
        from fedcore.serverside.checkpoint import load_checkpoint

        load_checkpoint(resume_dir, expect=cfg)  # refuse a bad checkpoint before starting
        run_dir = resume_dir
    elif args.out:
        run_dir = Path(args.out)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(
                "--out", str(run_dir), "exists and is not empty; choose a new directory"
            )
    else:
        from fedcore.serverside.rundir import default_run_dir

        run_dir = default_run_dir(cfg)
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
    run_embedded(
        server_app,
        client_app="clients.app:app",
        run_config=to_flat(cfg),
        client_config=client_config,
        num_clients=cfg.run.clients,
        workers=cfg.engine.workers,
        server_node_config={
            "run-dir": str(run_dir),
            "progress": True,
            "resume": resume_dir is not None,
        },
        client_state_dir=run_dir / "client-state",
    )
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(prog="fedcore", description="Federated learning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a simulation on the embedded engine")
    sim.add_argument("config", nargs="?", help="TOML config (default: simulations/default.toml)")
    sim.add_argument("--out", help="run directory to create (default: <run.out-dir>/<timestamp>)")
    sim.add_argument("--rounds", type=int, help="override run.rounds")
    sim.add_argument("--clients", type=int, help="override run.clients")
    sim.add_argument("--seed", type=int, help="override run.seed")
    sim.add_argument("--workers", type=int, help="override engine.workers (0 = one per core)")
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


def _show_warning_once(message: Warning | str, *_: object, **__: object) -> None:
    """Print a warning as ``fedcore: warning: ...``, each text once per process.

    A resumed run reads its config twice (the run directory's and the checkpoint's);
    the user needs each rename notice once.
    """
    text = str(message)
    if text not in _SHOWN:
        _SHOWN.add(text)
        print(f"fedcore: warning: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedcore`` console script."""
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
