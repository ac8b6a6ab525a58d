"""Stock Flower ServerApp for the deployment-latency baseline: Flower's FedAvg on its own grid.

Same model, data and client training as fedcore's run (it builds the model from
the fedcore config in the run config and talks to the fedcore ClientApp, which
follows Flower's message conventions), but the round loop is Flower's
``FedAvg.start`` on the deployment engine's ``HttpGrid`` (3 s between pulls).
It writes the wall-clock time at the end of each round's central evaluation to
``<deploy.run-dir>/flower_rounds.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedcore.clientside.data import holdout
from fedcore.clientside.training import evaluate, make_loader
from fedcore.core.config import config_from_flat
from fedcore.core.records import load_arrays, model_to_arrays
from fedcore.runtime.serve import initial_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``run.rounds`` rounds of Flower's FedAvg and record when each one ended."""
    cfg = config_from_flat(context.run_config)
    _, test = holdout(cfg.data, seed=cfg.run.seed)
    model = initial_model(cfg, test)
    loader = make_loader(test, batch_size=512, shuffle=False)
    stamps: list[float] = []
    out = Path(cfg.deploy.run_dir) / "flower_rounds.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def central(server_round: int, arrays: object) -> MetricRecord:
        load_arrays(model, arrays)  # type: ignore[arg-type]
        metrics = evaluate(model, loader)
        stamps.append(time.time())
        out.write_text(json.dumps({"stamps": stamps, "accuracy": metrics["accuracy"]}))
        return MetricRecord(metrics)

    n = cfg.run.clients
    strategy = FedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    strategy.start(
        grid=grid,
        initial_arrays=model_to_arrays(model),
        num_rounds=cfg.run.rounds,
        train_config=ConfigRecord(
            {
                "lr": cfg.train.lr,
                "local-epochs": cfg.train.local_epochs,
                "batch-size": cfg.train.batch_size,
            }
        ),
        evaluate_fn=central,
    )
