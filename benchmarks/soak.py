"""Soak: 100 clients x 200 rounds on the embedded engine; memory must stay flat.

Records the summed RSS of the server process and its worker processes right after
round 10 and round 200, and the peak sampled every 50 ms. Last line: one JSON object.

    .venv/bin/python benchmarks/soak.py [--rounds 200] [--clients 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from _proc import tree_rss  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

from fedcore.core.config import config_from_dict, to_flat  # noqa: E402
from fedcore.engines.embedded import run_embedded  # noqa: E402
from fedcore.runtime.serve import serve  # noqa: E402
from fedcore.serverside.rounds import Observer  # noqa: E402


class RssAtRounds(Observer):
    def __init__(self, marks: set[int]) -> None:
        self.marks = marks
        self.at: dict[int, int] = {}
        self.peak = 0
        self.peak_by_round: dict[int, int] = {}
        self._round = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss()
            self.peak = max(self.peak, rss)
            self.peak_by_round[self._round] = max(self.peak_by_round.get(self._round, 0), rss)
            time.sleep(0.05)

    def round_finished(self, record, arrays, rejected) -> None:
        self._round = record.round
        if record.round in self.marks:
            self.at[record.round] = tree_rss()

    def stop(self) -> None:
        self._stop.set()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--clients", type=int, default=100)
    args = ap.parse_args()
    cfg = config_from_dict(
        {
            "run": {"rounds": args.rounds, "clients": args.clients, "centralized-baseline": False},
            "data": {
                "source": "synthetic",
                "synthetic-examples": 5000,
                "synthetic-classes": 5,
                "partition": "dirichlet",
                "alpha": 1.0,
            },
            "model": {"factory": "mlp", "kwargs": {"hidden": 64}},
            "train": {"local-epochs": 1, "batch-size": 16, "lr": 0.05},
            "strategy": {"fraction-evaluate": 0.1},
        }
    )
    early = 10
    obs = RssAtRounds({early, args.rounds})
    app = ServerApp()

    @app.main()
    def _main(grid, context):
        serve(grid, context, observers=[obs])

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_embedded(
            app,
            client_app="clients.app:app",
            run_config=to_flat(cfg),
            num_clients=args.clients,
            server_node_config={"run-dir": str(Path(tmp) / "run")},
        )
        rows = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    obs.stop()
    wall = time.perf_counter() - t0
    mb = 1024 * 1024
    early_peak = max(v for r, v in obs.peak_by_round.items() if r <= early)
    late_peak = max(v for r, v in obs.peak_by_round.items() if r > args.rounds - early)
    result = {
        "benchmark": "soak",
        "clients": args.clients,
        "rounds": args.rounds,
        "wall_s": round(wall, 1),
        "rss_after_round_10_mb": round(obs.at[early] / mb, 1),
        f"rss_after_round_{args.rounds}_mb": round(obs.at[args.rounds] / mb, 1),
        "growth_pct": round(100 * (obs.at[args.rounds] / obs.at[early] - 1), 2),
        "peak_rounds_1_10_mb": round(early_peak / mb, 1),
        "peak_last_10_rounds_mb": round(late_peak / mb, 1),
        "peak_growth_pct": round(100 * (late_peak / early_peak - 1), 2),
        "final_accuracy": rows[-1]["test_accuracy"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
