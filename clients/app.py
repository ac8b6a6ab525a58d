"""The fedcore ClientApp: local data -> local training -> reply.

Each client reads only its own data: its partition in simulation
(``partition-id`` in the node config), or its own file in deployment
(``data-path`` in the node config).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcore.client import handle_evaluate, handle_train

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on local data."""
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on local validation data."""
    return handle_evaluate(msg, context)
