"""fedcore's ClientApp with injected faults, steered by environment variables.

FLAKY_FAIL="2,3"        partitions 2 and 3 raise in every training round
FLAKY_FAIL="1@2,0@*"    partition 1 raises in round 2; partition 0 in every round
FLAKY_NAN="1"           partition 1 replies NaN weights
FLAKY_SLEEP="0:3.0"     partition 0 sleeps 3 s before training
"""

from __future__ import annotations

import os
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedcore.clientside.handlers import handle_evaluate, handle_train

app = ClientApp()


def _fails(pid: int, rnd: int) -> bool:
    for item in filter(None, os.environ.get("FLAKY_FAIL", "").split(",")):
        part, _, when = item.partition("@")
        if int(part) == pid and (not when or when == "*" or int(when) == rnd):
            return True
    return False


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content.config_records["config"]["server-round"])
    if _fails(pid, rnd):
        raise RuntimeError(f"injected failure: partition {pid}, round {rnd}")
    for item in filter(None, os.environ.get("FLAKY_SLEEP", "").split(",")):
        part, _, secs = item.partition(":")
        if int(part) == pid:
            time.sleep(float(secs))
    reply = handle_train(msg, context)
    if str(pid) in os.environ.get("FLAKY_NAN", "").split(","):
        arrays = reply.content.array_records["arrays"]
        poisoned = ArrayRecord(
            {
                k: Array(np.full(a.shape, np.nan, dtype=a.dtype)) if "float" in a.dtype else a
                for k, a in arrays.items()
            }
        )
        return Message(
            RecordDict({"arrays": poisoned, "metrics": reply.content.metric_records["metrics"]}),
            reply_to=msg,
        )
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, context)
