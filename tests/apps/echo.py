"""Tiny ClientApp for engine tests: echo, fail, crash or sleep on request."""

from __future__ import annotations

import os
import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    conf = msg.content.config_records["config"]
    pid = int(context.node_config["partition-id"])
    action = conf.get(f"action-{pid}", "echo")
    if action == "raise":
        raise RuntimeError(f"client {pid} was told to fail")
    if action == "crash":
        os._exit(3)
    if action == "sleep":
        time.sleep(float(conf.get("sleep", 2.0)))
    # Context.state persists across rounds for the same virtual client.
    calls = context.state.config_records.get("calls", ConfigRecord({"n": 0}))
    calls["n"] = int(calls["n"]) + 1
    context.state.config_records["calls"] = calls
    metrics = MetricRecord(
        {"num-examples": pid + 1, "partition": pid, "calls": int(calls["n"]), "pid": os.getpid()}
    )
    return Message(
        RecordDict({"arrays": msg.content.array_records["arrays"], "metrics": metrics}),
        reply_to=msg,
    )
