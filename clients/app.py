"""The fedcore ClientApp: local data -> local training -> reply.

Each client reads only its own data: its partition in simulation
(``partition-id`` in the node config), or its own file in deployment
(``data-path`` in the node config). With secure aggregation (the default) the
server sends ``train.secagg``/``evaluate.secagg`` messages instead of
``train``/``evaluate``: the same training and evaluation run inside the SecAgg+
exchange and only a masked vector leaves the client.

The client decides what runs (:mod:`fedcore.clientside.policy`): its model, loops and
data settings come from its own config, never the server's run config, and a plain
``train``/``evaluate`` message is refused unless this client allows plain rounds
(the Flower ``Mod`` :func:`~fedcore.clientside.policy.plain_round_mod`:
``secagg.enabled = false`` in its config, or ``fedcore client --allow-plain``).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcore.clientside.handlers import handle_evaluate, handle_train
from fedcore.clientside.policy import plain_round_mod
from fedcore.clientside.wire import packed_arrays_mod
from fedcore.secagg.handler import handle_secagg

# packed arrays (deployment, fedcore.core.packing) are unpacked before every handler
app = ClientApp(mods=[packed_arrays_mod])


@app.train(mods=[plain_round_mod])
def train(msg: Message, context: Context) -> Message:
    """Train the global model on local data (a plain round: only if this client allows it)."""
    return handle_train(msg, context)


@app.train("secagg")
def train_secagg(msg: Message, context: Context) -> Message:
    """One stage of a secure-aggregation round (the training happens in its masked stage)."""
    return handle_secagg(msg, context, train=handle_train)


@app.evaluate(mods=[plain_round_mod])
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on local validation data (plain: only if allowed)."""
    return handle_evaluate(msg, context)


@app.evaluate("secagg")
def evaluate_secagg(msg: Message, context: Context) -> Message:
    """One stage of a securely aggregated evaluation (only masked metrics leave the client)."""
    return handle_secagg(msg, context, evaluate=handle_evaluate)
