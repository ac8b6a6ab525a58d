"""Two secure rounds on Flower's Ray simulation engine (run as a script by a slow test).

The unchanged fedcore ClientApp on 4 Ray-backed virtual SuperNodes; a small
ServerApp drives :class:`fedcore.secagg.server.SecureTrainStage` through
Flower's own Grid and prints one ``RAYCHECK <json>`` line.
"""

import json
import os
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from flwr.app import ConfigRecord, Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

server = ServerApp()
OUT = {}


@server.main()
def main(grid: Grid, context: Context) -> None:
    from fedcore.config import config_from_flat
    from fedcore.data import holdout
    from fedcore.federation import Observer, wait_for_nodes
    from fedcore.records import model_to_arrays
    from fedcore.secagg.server import SecAggSettings, SecureTrainStage
    from fedcore.server import initial_model
    from fedcore.strategies import FedAvg

    cfg = config_from_flat(context.run_config)
    nodes = wait_for_nodes(grid, 4, 60)
    _, test = holdout(cfg.data, seed=cfg.run.seed)
    arrays = model_to_arrays(initial_model(cfg, test))
    stage = SecureTrainStage(SecAggSettings(stage_timeout=60), seed=0)
    for rnd in (1, 2):
        t = time.perf_counter()
        tr = stage(
            grid,
            FedAvg(seed=0),
            server_round=rnd,
            arrays=arrays,
            config=ConfigRecord({"lr": 0.05, "local-epochs": 1, "batch-size": 32}),
            node_ids=nodes,
            timeout=120,
            observer=Observer(),
        )
        OUT[rnd] = {
            "clients": tr.num_clients,
            "examples": tr.num_examples,
            "rejected": [str(r) for r in tr.rejected],
            "ok": tr.arrays is not None,
            "s": time.perf_counter() - t,
            "loss": tr.metrics,
        }
        if tr.arrays is not None:
            arrays = tr.arrays
    print("RAYCHECK", json.dumps(OUT), flush=True)


if __name__ == "__main__":
    from clients.app import app as client_app

    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}},
    )
