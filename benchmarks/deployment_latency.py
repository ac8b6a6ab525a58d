"""Seconds per round of a real loopback deployment: fedcore (plain, secure) vs stock Flower.

All arms: 3 clients, the default CNN on the digits (``--model mlp``: the issue-4
setup, an MLP with 32 hidden units on synthetic features), the same data split
into one .npz per client, TLS with the same provisioned certificate, node
authentication with the same provisioned identities, every party a separate
process on 127.0.0.1.

- ``fedcore``: ``fedcore server`` (Flower's SuperLink behind the listener guard,
  which holds empty pulls until a push; fedcore's ServerApp) + ``fedcore client``
  x 3 (ClientApp in-process, one torch thread), plain rounds;
- ``secure``: the same with secure aggregation (training and evaluation);
- ``flower``: ``flower-superlink`` + ``flower-supernode`` x 3 (default isolation:
  SuperExec starts one ``flwr-clientapp`` process per message, node config
  ``allow-plain=true``) running a stock ServerApp
  (``benchmarks/flower_serverapp.py``: Flower's ``FedAvg.start`` on its
  ``HttpGrid``) and the fedcore ClientApp.

A round is measured from the end of one round's central evaluation to the end
of the next one's; round 1 (start-up, clients joining) is left out.

    python benchmarks/deployment_latency.py [--arms fedcore,secure,flower]
        [--fedcore-rounds 8] [--flower-rounds 4] [--model cnn|mlp] [--breakdown]
        [--requests] [--keep]

``--breakdown`` keeps the work directory; each client's log then has one line per
message: waited (since its last reply), receive, app, send.

``--requests`` has the fedcore arms' guard log every request the SuperLink serves
(``FEDCORE_GUARD_STATS``, :mod:`fedcore.deploy.superlink`) and prints, per API
route, the requests per round and the asks of the app per round (a held pull asks
again when woken), with their median seconds, over rounds 2..N (JSON key
``*_requests_per_round``), and the median stage trip: from one ServerApp
``push-messages`` to the next (``*_stage_trip_median_ms``; a secure round is 10
trips, a plain one 2).

Last line: one JSON object with ``fedcore_round_s``, ``fedcore_secagg_round_s``
and ``flower_round_s`` (means; ``*_median_s`` and each round beside them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from fedcore.core.config import Config, config_from_dict, to_dict, to_toml  # noqa: E402
from fedcore.deploy.local import carve  # noqa: E402
from fedcore.deploy.provision import provision  # noqa: E402
from fedcore.deploy.superlink import GUARD_STATS_ENV  # noqa: E402
from fedcore.engines.processes import ProcessTree, free_port  # noqa: E402

CLIENTS = 3
#: ``--breakdown``: clients log each message's timings (receive, app, send) to their logs.
VERBOSE = False
#: ``--requests``: the fedcore arms' guard logs each request (``*_requests_per_round``).
REQUESTS = False


def config(rounds: int, run_dir: Path, *, model: str = "cnn", secure: bool = False) -> Config:
    """The issue's setup: the default CNN on the digits, 3 clients; plain or secure rounds."""
    data: dict[str, object] = {"source": "digits", "partition": "iid"}
    model_section: dict[str, object] = {"factory": "cnn"}
    if model == "mlp":  # the earlier (issue 4) setup: a small MLP on synthetic features
        data = {
            "source": "synthetic",
            "synthetic-examples": 600,
            "partition": "iid",
            "num-classes": 10,
        }
        model_section = {"factory": "mlp", "kwargs": {"hidden": 32}}
    return config_from_dict(
        {
            "run": {"seed": 1, "rounds": rounds, "clients": CLIENTS, "centralized-baseline": False},
            "data": data,
            "model": model_section,
            "train": {"local-epochs": 1, "batch-size": 16},
            "strategy": {"min-train-clients": CLIENTS, "min-evaluate-clients": CLIENTS},
            "round": {"min-available-clients": CLIENTS},
            "secagg": {"enabled": secure},
            "deploy": {"run-dir": str(run_dir)},
        }
    )


def _wait(proc: object, timeout: float, what: str) -> int:
    import subprocess

    try:
        return int(proc.wait(timeout=timeout))  # type: ignore[attr-defined]
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{what} did not finish within {timeout:.0f} s") from None


def _tag(secure: bool) -> str:
    """The file-name prefix of a fedcore arm's run, logs and request statistics."""
    return "fedcore-secure" if secure else "fedcore"


def fedcore_arm(
    base: Path, rounds: int, fed: object, data: list[Path], *, model: str, secure: bool
) -> list[float]:
    tag = _tag(secure)
    run_dir = base / f"{tag}-run"
    cfg = config(rounds, run_dir, model=model, secure=secure)
    cfg_path = base / f"{tag}.toml"
    cfg_path.write_text(to_toml(cfg))
    port, local_port = free_port(), free_port()
    cli = [sys.executable, "-m", "fedcore.cli"]
    logs = base / "logs"
    with ProcessTree() as sup:
        stats = logs / f"{tag}-requests.txt"
        with open(logs / f"{tag}-server.log", "wb") as f:
            server = sup.start(
                "server",
                [
                    *cli,
                    "server",
                    "--kit",
                    str(fed.server_kit),  # type: ignore[attr-defined]
                    "--address",
                    f"127.0.0.1:{port}",
                    "--local-port",
                    str(local_port),
                    str(cfg_path),
                ],
                env={GUARD_STATS_ENV: str(stats)} if REQUESTS else None,
                stdout=f,
            )
        for i, path in enumerate(data):
            name = f"client-{i + 1}"
            with open(logs / f"{tag}-{name}.log", "wb") as f:
                sup.start(
                    name,
                    [
                        *cli,
                        "client",
                        "--kit",
                        str(fed.client_kit(name)),  # type: ignore[attr-defined]
                        "--server",
                        f"127.0.0.1:{port}",
                        "--data",
                        str(path),
                        "--config",
                        str(cfg_path),
                        "--once",
                        *(["--verbose"] if VERBOSE else []),
                    ],
                    stdout=f,
                )
        rc = _wait(server, 900, "the fedcore run")
    if rc != 0:
        raise SystemExit(f"fedcore server failed; see {logs}")
    rows = json.loads((run_dir / "metrics.json").read_text())
    return [float(r["seconds"]) for r in rows[1:]]


def request_table(path: Path, rounds: list[float]) -> dict[str, dict[str, float]]:
    """Per route: requests and asks per round, and their median seconds, over ``rounds``.

    The window is the last ``sum(rounds)`` seconds before the run's last reply
    (its last Fleet ``push-messages``), i.e. rounds 2..N.
    """
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    rows = [(float(t), route, kind, float(sec)) for t, route, kind, sec in lines]
    end = max(t for t, route, _, _ in rows if route == "/v1/fleet/push-messages")
    start = end - sum(rounds)
    table: dict[str, dict[str, float]] = {}
    for route in sorted({r for _, r, _, _ in rows}):
        entry: dict[str, float] = {}
        for kind in ("request", "ask"):
            xs = [sec for t, r, k, sec in rows if r == route and k == kind and start < t <= end]
            if xs:
                entry[f"{kind}s"] = round(len(xs) / len(rounds), 1)
                entry[f"{kind}_median_ms"] = round(1000 * statistics.median(xs), 1)
        if entry:
            table[route] = entry
    return table


#: The ServerApp's push of a stage: Flower's request, or fedcore's bundled one (issue 11).
STAGE_PUSHES = ("/v1/runtime/push-messages", "/fedcore/v1/runtime/push-messages")


def stage_trips_ms(path: Path, rounds: list[float]) -> list[float]:
    """Milliseconds from each ServerApp ``push-messages`` to the next, over ``rounds``.

    A stage trip: the ServerApp pushes a stage's messages, the clients answer, it
    pulls the replies and pushes the next stage (a secure round is 10 of them, a plain
    one 2). Same window as :func:`request_table` (which ends at the last Fleet
    ``push-messages``, asked of the SuperLink app by a bundled push too).
    """
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    rows = [(float(t), route, kind, float(sec)) for t, route, kind, sec in lines]
    end = max(t for t, route, _, _ in rows if route == "/v1/fleet/push-messages")
    start = end - sum(rounds)
    pushes = sorted(
        t - sec
        for t, route, kind, sec in rows
        if route in STAGE_PUSHES and kind == "request" and start < t <= end
    )
    return [1000 * (b - a) for a, b in zip(pushes, pushes[1:], strict=False)]


def _flower_fab(cfg: Config) -> bytes:
    import tomli_w
    from flwr.cli.build import build_fab_from_files

    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "flowerbaseline",
            "version": "1.0.0",
            "description": "baseline",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "bench",
                    "components": {
                        "serverapp": "flower_serverapp:app",
                        "clientapp": "clients.app:app",
                    },
                    "config": to_dict(cfg),
                }
            }
        },
    }
    files = {
        "pyproject.toml": tomli_w.dumps(pyproject).encode(),
        "flower_serverapp.py": (ROOT / "benchmarks" / "flower_serverapp.py").read_bytes(),
        "clients/__init__.py": (ROOT / "clients" / "__init__.py").read_bytes(),
        "clients/app.py": (ROOT / "clients" / "app.py").read_bytes(),
    }
    return build_fab_from_files(files)[0]


def flower_arm(
    base: Path, rounds: int, fed: object, data: list[Path], *, model: str
) -> list[float]:
    import httpx
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import ListRunsRequest, RegisterNodeRequest, StartRunRequest
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.fab import Fab

    from fedcore.storage.keys import load_admitted_keys, public_key_pem

    run_dir = base / "flower-run"
    cfg = config(rounds, run_dir, model=model)
    kit = fed.server_kit  # type: ignore[attr-defined]
    port = free_port()
    logs = base / "logs"
    flwr_env = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    with ProcessTree() as sup:
        with open(logs / "flower-superlink.log", "wb") as f:
            link = sup.start(
                "superlink",
                [
                    "flower-superlink",
                    "--ssl-ca-certfile",
                    str(kit / "ca.pem"),
                    "--ssl-certfile",
                    str(kit / "server.pem"),
                    "--ssl-keyfile",
                    str(kit / "server.key"),
                    "--enable-supernode-auth",
                    "--disable-runtime-dependency-installation",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env={**flwr_env, "FLWR_HOME": str(base / "flwr-home-link")},
                stdout=f,
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                if (
                    httpx.get(
                        f"https://127.0.0.1:{port}/health", verify=str(kit / "ca.pem")
                    ).status_code
                    == 200
                ):
                    break
            except httpx.HTTPError:
                pass
            if link.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"flower-superlink did not start; see {logs}")
            time.sleep(0.2)
        control = ControlHttpClient.from_server_address(
            f"127.0.0.1:{port}", False, (kit / "ca.pem").read_bytes(), interceptors=[]
        )
        for name, key in load_admitted_keys(kit).items():  # what `flwr supernode register` does
            control.RegisterNode(RegisterNodeRequest(public_key=public_key_pem(key), name=name))
        for i, path in enumerate(data):
            name = f"client-{i + 1}"
            ck = fed.client_kit(name)  # type: ignore[attr-defined]
            with open(logs / f"flower-{name}.log", "wb") as f:
                sup.start(
                    name,
                    [
                        "flower-supernode",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--root-certificates",
                        str(ck / "ca.pem"),
                        "--auth-supernode-private-key",
                        str(ck / "identity.key"),
                        "--node-config",
                        f"data-path='{path}' allow-plain=true",
                        "--port",
                        str(free_port()),
                    ],
                    env={**flwr_env, "FLWR_HOME": str(base / f"flwr-home-{name}")},
                    stdout=f,
                )
        fab_bytes = _flower_fab(cfg)
        res = control.StartRun(
            StartRunRequest(
                fab=fab_to_proto(Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})),
                override_config=user_config_to_proto({}),
            )
        )
        deadline = time.monotonic() + 1800
        while True:
            run = control.ListRuns(ListRunsRequest(run_id=res.run_id)).run_dict[res.run_id]
            if run.status.status == "finished":
                break
            if time.monotonic() > deadline:
                raise SystemExit("the Flower run did not finish within 30 min")
            time.sleep(1)
        control.close()
    if run.status.sub_status != "completed":
        raise SystemExit(
            f"the Flower run {run.status.sub_status}: {run.status.details}; see {logs}"
        )
    stamps = json.loads((run_dir / "flower_rounds.json").read_text())["stamps"]
    # stamps[0] = initial evaluation, stamps[r] = end of round r; round 1 is left out
    return [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]


def _round_stats(xs: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(xs), 3), "median": round(statistics.median(xs), 3)}


def main() -> None:
    global VERBOSE, REQUESTS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fedcore-rounds", type=int, default=8)
    p.add_argument("--flower-rounds", type=int, default=4)
    p.add_argument(
        "--model", choices=("cnn", "mlp"), default="cnn", help="cnn: the default CNN (digits)"
    )
    p.add_argument(
        "--arms",
        default="fedcore,secure,flower",
        help="comma-separated subset of fedcore (plain), secure (secure aggregation), flower",
    )
    p.add_argument(
        "--breakdown", action="store_true", help="clients log per-message timings (implies --keep)"
    )
    p.add_argument(
        "--requests", action="store_true", help="count the SuperLink's requests per round"
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = sorted(set(arms) - {"fedcore", "secure", "flower"})
    if bad or not arms:
        p.error(f"--arms {args.arms!r}: use a subset of fedcore,secure,flower (bad: {bad})")
    VERBOSE = args.breakdown
    REQUESTS = args.requests
    keep = args.keep or args.breakdown
    base = Path(tempfile.mkdtemp(prefix="fedcore-bench-deploy-"))
    (base / "logs").mkdir()
    out: dict[str, object] = {}
    try:
        fed = provision(base / "fed", clients=CLIENTS)
        data = carve(config(1, base, model=args.model), base / "data")
        for arm in arms:
            t = time.perf_counter()
            if arm == "flower":
                rounds, n = (
                    flower_arm(base, args.flower_rounds, fed, data, model=args.model),
                    args.flower_rounds,
                )
            else:
                secure = arm == "secure"
                rounds = fedcore_arm(
                    base, args.fedcore_rounds, fed, data, model=args.model, secure=secure
                )
                n = args.fedcore_rounds
            wall = time.perf_counter() - t
            key = {"fedcore": "fedcore", "secure": "fedcore_secagg", "flower": "flower"}[arm]
            print(
                f"{key}: rounds 2..{n}: {[round(x, 2) for x in rounds]} s "
                f"(whole run incl. start-up {wall:.1f} s)",
                flush=True,
            )
            stats = _round_stats(rounds)
            out[f"{key}_round_s"] = stats["mean"]
            out[f"{key}_round_median_s"] = stats["median"]
            out[f"{key}_rounds_s"] = [round(x, 3) for x in rounds]
            out[f"{key}_run_s"] = round(wall, 1)
            if REQUESTS and arm != "flower":
                stats_file = base / "logs" / f"{_tag(arm == 'secure')}-requests.txt"
                table = request_table(stats_file, rounds)
                out[f"{key}_requests_per_round"] = table
                trips = stage_trips_ms(stats_file, rounds)
                if trips:
                    out[f"{key}_stage_trip_median_ms"] = round(statistics.median(trips), 1)
                print(f"{key}: SuperLink requests per round (rounds 2..{n}):", flush=True)
                for route, entry in table.items():
                    print(f"  {route:40s} {entry}", flush=True)
                if trips:
                    print(
                        f"{key}: {len(trips)} stage trips, median "
                        f"{statistics.median(trips):.0f} ms",
                        flush=True,
                    )
    finally:
        if keep:
            print(f"work directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    if "fedcore_round_s" in out and "flower_round_s" in out:
        out["speedup"] = round(float(out["flower_round_s"]) / float(out["fedcore_round_s"]), 1)  # type: ignore[arg-type]
    out.update(
        {
            "model": args.model,
            "clients": CLIENTS,
            "tls": True,
            "node_auth": True,
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
        }
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
