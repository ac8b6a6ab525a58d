"""The same fedcore apps on the embedded engine and on Flower's simulation engine (Ray).

Scenario A (``--clients 10 --rounds 3``): ``simulations/default.toml`` (digits,
the small CNN, Dirichlet 0.5) with fewer rounds and no centralized baseline,

- embedded: ``python -m fedcore.cli simulate CONFIG --out DIR`` (a fresh process),
  with the default executors (one per core: the server process and one forked
  worker) and again with ``engine.workers = 1`` (all clients in the server process);
- Ray: ``flwr run`` of the same Flower App with the same run config, through
  :func:`fedcore.engines.flower_sim.run_flower_simulation` (private FLWR_HOME,
  local SuperLink started for the run, one CPU per ClientApp so both engines run
  two clients at a time on two cores).

Wall time is from starting the first process until the run has finished (for
Ray: SuperLink start until ``flwr run --stream`` returns). Memory is the peak,
over the run, of RSS and of PSS summed over every process of the run (sampled
every 0.2 s with psutil; PSS counts a page shared by k processes 1/k in each).

Scenario B (``--big-clients 1000``): one round with 1,000 virtual clients on the
embedded engine (synthetic data, 20 examples per client, IID, the MLP, plain
aggregation; ``--big-secagg``: with secure aggregation, as the config's default).
Its JSON keys: ``round_1000_clients_s`` (the round itself, from ``metrics.json``),
``wall_1000_clients_s``, ``peak_pss_1000_mib`` and ``peak_rss_1000_mib``.
Scenario C (``--huge-clients 10000``, off by default: minutes): the same with
10,000 clients, keys ``round_10000_clients_s`` and so on.

    python benchmarks/simulation_engines.py [--clients 10] [--rounds 3] [--big-clients 1000]
                                            [--huge-clients 0] [--big-secagg]
                                            [--skip-ray] [--skip-big] [--skip-small]

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedcore.core.config import Config, to_flat, to_toml
from fedcore.engines.flower_sim import run_flower_simulation
from fedcore.engines.processes import ProcessTree
from fedcore.storage.configfile import load_config

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def scenario_config(clients: int, rounds: int) -> Config:
    """``simulations/default.toml`` with ``clients``, ``rounds`` and no baseline."""
    cfg = load_config(ROOT / "simulations" / "default.toml")
    return cfg.replace(run={"clients": clients, "rounds": rounds, "centralized-baseline": False})


def big_config(clients: int, *, secagg: bool = False) -> Config:
    """One round, ``clients`` IID clients of synthetic data, the MLP (plain by default)."""
    return load_config(ROOT / "simulations" / "default.toml").replace(
        run={"clients": clients, "rounds": 1, "centralized-baseline": False},
        data={"source": "synthetic", "synthetic-examples": 20 * clients, "partition": "iid"},
        model={"factory": "mlp"},
        train={"local-epochs": 1},
        secagg={"enabled": secagg},
    )


def many_clients(clients: int, work: Path, *, secagg: bool = False) -> dict[str, Any]:
    """Scenario B/C: one round of ``clients`` clients; its figures under flat keys too."""
    work.mkdir()
    run = run_embedded_cli(big_config(clients, secagg=secagg), work)
    suffix = f"{clients}_clients" + ("_secagg" if secagg else "")
    return {
        "run": {"clients": clients, "secagg": secagg, **run},
        f"round_{suffix}_s": run["round_seconds"][0],
        f"wall_{suffix}_s": run["seconds"],
        f"peak_pss_{suffix}_mib".replace("_clients", ""): run["peak_pss_mib"],
        f"peak_rss_{suffix}_mib".replace("_clients", ""): run["peak_rss_mib"],
    }


def _run_dir_summary(run_dir: Path) -> dict[str, Any]:
    rows = json.loads((run_dir / "metrics.json").read_text())
    return {
        "rounds": len(rows),
        "final_accuracy": rows[-1]["test_accuracy"],
        "clients_per_round": [r["clients"] for r in rows],
        "round_seconds": [round(r["seconds"], 3) for r in rows],
    }


def run_embedded_cli(cfg: Config, work: Path) -> dict[str, Any]:
    """``fedcore simulate`` in a fresh process, its whole tree sampled."""
    config_file = work / "embedded.toml"
    config_file.write_text(to_toml(cfg), encoding="utf-8")
    run_dir = work / "embedded-run"
    tree = ProcessTree(sample_interval=0.2)
    tree.start_sampling()
    t0 = time.perf_counter()
    proc = subprocess.Popen(  # noqa: S603 - fixed argv
        [sys.executable, "-m", "fedcore.cli", "simulate", str(config_file), "--out", str(run_dir)],
        cwd=ROOT,
        env=tree.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    tree.add_root(proc.pid)
    out, _ = proc.communicate(timeout=1800)
    seconds = time.perf_counter() - t0
    peak = tree.stop_sampling()
    leftovers = tree.kill_survivors()
    if proc.returncode != 0:
        raise SystemExit(f"fedcore simulate failed ({proc.returncode}):\n{out.decode()[-3000:]}")
    return {
        "seconds": seconds,
        "peak_rss_mib": peak.rss / MIB,
        "peak_pss_mib": peak.pss / MIB,
        "peak_processes": peak.processes,
        "leftover_processes": leftovers,
        **_run_dir_summary(run_dir),
    }


def run_ray(cfg: Config, work: Path) -> dict[str, Any]:
    """``flwr run`` of the same app and run config on Flower's Ray engine."""
    out_dir = work / "ray-runs"
    flat = {k: v for k, v in to_flat(cfg).items() if not k.startswith("model.kwargs.")}
    flat["run.out-dir"] = str(out_dir)
    result = run_flower_simulation(
        ROOT,
        run_config=flat,
        num_supernodes=cfg.run.clients,
        client_cpus=1,
        timeout=1800,
        sample=True,
    )
    if not result.completed:
        raise SystemExit(f"Ray run did not complete: {result.status}\n{result.output[-3000:]}")
    (run_dir,) = list(out_dir.iterdir())
    return {
        "seconds": result.seconds,
        "peak_rss_mib": result.peak.rss / MIB,
        "peak_pss_mib": result.peak.pss / MIB,
        "peak_processes": result.peak.processes,
        "leftover_processes": list(result.leftovers),
        **_run_dir_summary(run_dir),
    }


def main() -> None:
    """Run the scenarios and print the JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--big-clients", type=int, default=1000)
    p.add_argument("--huge-clients", type=int, default=0, help="0: skip scenario C")
    p.add_argument("--big-secagg", action="store_true", help="scenario B with secure aggregation")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--skip-small", action="store_true", help="skip scenario A")
    args = p.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

    result: dict[str, Any] = {
        "benchmark": "simulation_engines",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), "
        f"Python {platform.python_version()}",
        "clients": args.clients,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory(prefix="fedcore-bench-") as tmp:
        work = Path(tmp)
        cfg = scenario_config(args.clients, args.rounds)
        if not args.skip_small:
            _small(args, cfg, work, result)
        for label, n, secagg in (
            ("big", 0 if args.skip_big else args.big_clients, False),
            ("big_secagg", args.big_clients if args.big_secagg else 0, True),
            ("huge", args.huge_clients, False),
        ):
            if n:
                many = many_clients(n, work / label, secagg=secagg)
                result[label] = many.pop("run")
                result.update(many)
                print(f"{label}: {result[label]}", file=sys.stderr)
    print(json.dumps(result))


def _small(args: argparse.Namespace, cfg: Config, work: Path, result: dict[str, Any]) -> None:
    """Scenario A: embedded (two executors, then one) and Ray, into ``result``."""
    embedded = run_embedded_cli(cfg, work)
    result["embedded"] = embedded
    print(f"embedded: {embedded}", file=sys.stderr)
    # the same with one executor (every client in the server process: one process)
    single_work = work / "single"
    single_work.mkdir()
    single = run_embedded_cli(cfg.replace(engine={"workers": 1}), single_work)
    result["embedded_single_executor"] = single
    print(f"embedded, one executor: {single}", file=sys.stderr)
    if not args.skip_ray:
        ray = run_ray(cfg, work)
        result["ray"] = ray
        print(f"ray: {ray}", file=sys.stderr)
        result["speedup"] = ray["seconds"] / embedded["seconds"]
        result["memory_ratio"] = ray["peak_rss_mib"] / embedded["peak_rss_mib"]
        result["memory_ratio_pss"] = ray["peak_pss_mib"] / embedded["peak_pss_mib"]
        result["round_time_ratio"] = sum(ray["round_seconds"]) / sum(embedded["round_seconds"])
        result["speedup_single_executor"] = ray["seconds"] / single["seconds"]
        result["memory_ratio_single_executor"] = ray["peak_rss_mib"] / single["peak_rss_mib"]


if __name__ == "__main__":
    main()
