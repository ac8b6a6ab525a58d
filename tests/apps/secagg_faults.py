"""The fedcore ClientApp with faults injected on request, for secure-aggregation tests.

A ``train.secagg`` message whose ``"secagg"`` record carries ``test-fault``
makes this client raise (``"raise"``) or stall (``"sleep:<seconds>"``) at that
stage before doing its real work; everything else is the real fedcore client.
"""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcore.clientside.handlers import handle_evaluate, handle_train
from fedcore.secagg.handler import handle_secagg
from fedcore.secagg.protocol.wire import SECAGG

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@app.train("secagg")
def train_secagg(msg: Message, context: Context) -> Message:
    fault = str(msg.content.config_records[SECAGG].get("test-fault", ""))
    if fault == "raise":
        raise RuntimeError("injected fault: this client vanished")
    if fault.startswith("sleep:"):
        time.sleep(float(fault.split(":", 1)[1]))
    return handle_secagg(msg, context, train=handle_train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, context)


@app.evaluate("secagg")
def evaluate_secagg(msg: Message, context: Context) -> Message:
    return handle_secagg(msg, context, evaluate=handle_evaluate)
