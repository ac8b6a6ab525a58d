"""A client trains on exactly its train split, reports its size, and reshuffles each round.

``handle_train`` is driven as the ClientApp calls it: a real ``Context`` of a simulation
node (node config ``partition-id``/``num-partitions``, the fedcore config as the run
config) and a real training ``Message`` from the strategy. The configured
``model.train-fn`` is :func:`record_batches`, which trains nothing and records every
batch it is given; the rows are then found in ``local_data``'s train and val splits.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from fedcore.clientside.data import holdout
from fedcore.clientside.handlers import handle_train, local_data
from fedcore.core.config import config_from_dict, to_flat
from fedcore.core.records import METRICS, NUM_EXAMPLES, model_to_arrays
from fedcore.engines.embedded import node_id_for
from fedcore.runtime.serve import initial_model
from fedcore.serverside.strategies import FedAvg

BATCH = 8
SEEN: list[tuple[np.ndarray, np.ndarray]] = []


def record_batches(model, loader, settings):
    """A ``model.train-fn`` that records the (x, y) batches it sees, for every epoch."""
    for _ in range(settings.epochs):
        for x, y in loader:
            SEEN.append((x.numpy().copy(), y.numpy().copy()))
    return {"train_loss": 0.0}


@pytest.fixture(scope="module")
def cfg():
    return config_from_dict(
        {
            "run": {"seed": 11, "clients": 4, "centralized-baseline": False},
            "data": {"source": "synthetic", "synthetic-examples": 400, "partition": "iid"},
            "model": {
                "factory": "mlp",
                "kwargs": {"hidden": 8},
                "train-fn": f"{__name__}:record_batches",
            },
            "train": {"local-epochs": 1, "batch-size": BATCH},
        }
    )


@pytest.fixture(scope="module")
def arrays(cfg):
    _, test = holdout(cfg.data, seed=cfg.run.seed)
    return model_to_arrays(initial_model(cfg, test))


def _context(cfg, pid):
    return Context(
        run_id=1,
        node_id=node_id_for(pid),
        node_config={"partition-id": pid, "num-partitions": cfg.run.clients},
        state=RecordDict(),
        run_config=to_flat(cfg),
    )


def _train(cfg, arrays, context, server_round):
    """One training message for this node, handled; the rows it trained on, in order."""
    (msg,) = FedAvg(seed=cfg.run.seed).configure_train(
        server_round, arrays, ConfigRecord({"batch-size": BATCH}), [context.node_id]
    )
    SEEN.clear()
    reply = handle_train(msg, context)
    batches = list(SEEN)
    assert batches and all(1 <= len(x) <= BATCH and len(x) == len(y) for x, y in batches)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return reply, x, y


def _index(split):
    rows = {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(split.x))}
    assert len(rows) == len(split.x)  # rows are distinct, so each names one example
    return rows


@pytest.mark.parametrize("pid", [0, 2])
def test_a_client_trains_on_exactly_its_train_split_and_reports_its_size(cfg, arrays, pid):
    context = _context(cfg, pid)
    data = local_data(cfg, context.node_config)
    assert len(data.train) != len(data.val)  # so num-examples tells the two apart
    train_rows, val_rows = _index(data.train), _index(data.val)
    reply, x, y = _train(cfg, arrays, context, server_round=1)
    order = [train_rows.get(row.tobytes()) for row in x]
    assert not any(row.tobytes() in val_rows for row in x), "trained on validation examples"
    assert None not in order, "trained on rows that are not in its train split"
    assert sorted(order) == list(range(len(data.train)))  # every train example, once
    np.testing.assert_array_equal(y, data.train.y[order])  # with its own label
    assert reply.content.metric_records[METRICS][NUM_EXAMPLES] == len(data.train)


def test_a_client_shuffles_the_same_within_a_round_and_anew_each_round(cfg, arrays):
    context = _context(cfg, 1)
    data = local_data(cfg, context.node_config)
    rows = _index(data.train)

    def order(server_round):
        _, x, _ = _train(cfg, arrays, context, server_round)
        return [rows[row.tobytes()] for row in x]

    first = order(1)
    assert first != sorted(first)  # shuffled at all
    assert order(1) == first  # the same round again (same seed): the same order
    second, third = order(2), order(3)
    assert sorted(second) == sorted(third) == sorted(first)
    assert len({tuple(first), tuple(second), tuple(third)}) == 3  # a new order every round
    # and another client's round-1 order is its own: the seed names the client too (two
    # partitions of equal size, where one seed would give the same permutation)
    other = _context(cfg, 2)
    other_rows = _index(local_data(cfg, other.node_config).train)
    assert len(other_rows) == len(rows)
    _, x, _ = _train(cfg, arrays, other, 1)
    assert [other_rows[row.tobytes()] for row in x] != first
