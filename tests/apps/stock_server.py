"""stock_server: a ServerApp written like Flower's quickstart-pytorch ``server_app.py``.

FedAvg from ``flwr.serverapp.strategy``, ``num-server-rounds``, ``fraction-train`` and
``lr`` from the run config, the initial model from ``Net`` (the quickstart imports it
from its task.py; here it is inline, so the file stands alone, as in docs/engines.md).
It imports nothing from fedcore: it drives fedcore's ClientApp (``clients.app:app``)
the way a Flower user's server would. The quickstart saves the final model to
``final_model.pt``; this one keeps the ``Result`` in :data:`RESULTS` for the tests.
"""

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn


class Net(nn.Sequential):
    """Model: fedcore's ``model.factory = "mlp"`` with hidden=32, depth=1 (8x8 digits)."""

    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


#: The ``Result`` of every run in this process (the test reads the last one).
RESULTS: list = []

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""

    # Read run config
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]

    # Load global model
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    # Initialize FedAvg strategy
    strategy = FedAvg(fraction_train=fraction_train)

    # Start strategy, run FedAvg for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
    )
    RESULTS.append(result)
