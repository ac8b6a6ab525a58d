"""Oracles: on identical replies, fedcore's next model equals Flower 1.42's.

For every strategy Flower also has (``flwr.serverapp.strategy``), both sides start
from the same global model and run several rounds; in each, six clients with unequal
``num-examples`` reply ``their global + a seeded client-specific step`` (one of them
an outlier, so the robust strategies have something to reject). fedcore aggregates
with the plain exchange (``PlainExchange().aggregate``) and its strategy's
``server_update``; Flower with ``configure_train`` (which sets its current arrays)
and ``aggregate_train``. The models must agree within float32 rounding after every
round, with the same hyperparameters, so the optimizer state (momentum, moments)
is compared too.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower

from fedcore.core.seeds import rng
from fedcore.serverside.exchange import PlainExchange
from fedcore.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

NODES = [101, 102, 103, 104, 105, 106]
SIZES = [10, 35, 20, 50, 15, 40]
OUTLIER = 4  # this client's step is shifted by +3 everywhere
SHAPES = {"conv.weight": (3, 4), "conv.bias": (4,), "fc.weight": (2, 5)}
ROUNDS = 4


class _Grid:
    """The one thing Flower's ``configure_train`` asks of a grid: the connected nodes."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _initial() -> dict[str, np.ndarray]:
    g = rng(7, "oracle", "init")
    return {k: g.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _steps(rnd: int) -> list[dict[str, np.ndarray]]:
    """Each client's step this round: a client bias plus noise (float32)."""
    out = []
    for i in range(len(NODES)):
        g = rng(7, "oracle", "step", rnd, i)
        bias = 0.05 * (i - 2.5)
        step = {k: (bias + 0.1 * g.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
        if i == OUTLIER:
            step = {k: v + np.float32(3.0) for k, v in step.items()}
        out.append(step)
    return out


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def _replies(msgs, current: dict[str, np.ndarray], rnd: int) -> list[Message]:
    """One reply per message: ``current + step_i``, with ``num-examples = SIZES[i]``."""
    replies = []
    for i, (msg, step) in enumerate(zip(msgs, _steps(rnd), strict=True)):
        trained = {k: (current[k] + step[k]).astype(np.float32) for k in SHAPES}
        metrics = MetricRecord({"train_loss": 0.1 * i, "num-examples": SIZES[i]})
        replies.append(
            Message(RecordDict({"arrays": _record(trained), "metrics": metrics}), reply_to=msg)
        )
    return replies


def _fedcore_round(ours: Strategy, rnd: int, arrays: ArrayRecord) -> ArrayRecord:
    msgs = ours.configure_train(rnd, arrays, ConfigRecord(), NODES)
    assert len(msgs) == len(NODES)
    agg = PlainExchange().aggregate(
        _replies(msgs, _numpy(arrays), rnd),
        arrays=arrays,
        summed=ours.summed_records(arrays),
        individual=not ours.linear,
    )
    assert agg.num_clients == len(NODES) and not agg.rejected
    return ours.server_update(rnd, arrays, agg)


def _flower_round(theirs, rnd: int, arrays: ArrayRecord) -> ArrayRecord:
    msgs = list(theirs.configure_train(rnd, arrays, ConfigRecord(), _Grid()))
    new, _ = theirs.aggregate_train(rnd, _replies(msgs, _numpy(arrays), rnd))
    assert new is not None
    return new


CASES = {
    "fedavg": (lambda: FedAvg(), lambda: flower.FedAvg()),
    "fedavgm-defaults": (lambda: FedAvgM(), lambda: flower.FedAvgM(server_momentum=0.5)),
    "fedavgm": (
        lambda: FedAvgM.from_config({"server-learning-rate": 0.7, "server-momentum": 0.9}),
        lambda: flower.FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
    ),
    "fedadagrad": (
        lambda: FedAdagrad.from_config({"eta": 0.05, "tau": 0.01}),
        lambda: flower.FedAdagrad(eta=0.05, tau=0.01),
    ),
    "fedadagrad-defaults": (lambda: FedAdagrad(), lambda: flower.FedAdagrad(eta=0.01, tau=1e-3)),
    "fedadam": (
        lambda: FedAdam.from_config({"eta": 0.03, "beta-1": 0.8, "beta-2": 0.95, "tau": 0.01}),
        lambda: flower.FedAdam(eta=0.03, beta_1=0.8, beta_2=0.95, tau=0.01),
    ),
    "fedadam-defaults": (
        lambda: FedAdam(),
        lambda: flower.FedAdam(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3),
    ),
    "fedyogi": (
        lambda: FedYogi.from_config({"eta": 0.02, "beta-1": 0.5, "beta-2": 0.9, "tau": 0.005}),
        lambda: flower.FedYogi(eta=0.02, beta_1=0.5, beta_2=0.9, tau=0.005),
    ),
    "fedyogi-defaults": (
        lambda: FedYogi(),
        lambda: flower.FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3),
    ),
    "fedmedian": (lambda: FedMedian(), lambda: flower.FedMedian()),
    "fedtrimmedavg": (lambda: FedTrimmedAvg(), lambda: flower.FedTrimmedAvg(beta=0.2)),
    "fedtrimmedavg-0.34": (
        lambda: FedTrimmedAvg.from_config({"beta": 0.34}),
        lambda: flower.FedTrimmedAvg(beta=0.34),
    ),
    "krum": (
        lambda: Krum.from_config({"num-malicious-nodes": 1}),
        lambda: flower.Krum(num_malicious_nodes=1),
    ),
    "krum-f0": (lambda: Krum(), lambda: flower.Krum()),
    "multikrum-m-is-n-minus-f": (
        lambda: MultiKrum.from_config({"num-malicious-nodes": 1}),  # m = 6 - 1
        lambda: flower.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=5),
    ),
    "multikrum-defaults-are-fedavg": (lambda: MultiKrum(), lambda: flower.FedAvg()),
    "multikrum": (
        lambda: MultiKrum.from_config({"num-malicious-nodes": 1, "num-nodes-to-select": 3}),
        lambda: flower.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_next_model_equals_flowers_round_after_round(case):
    make_ours, make_theirs = CASES[case]
    ours, theirs = make_ours(), make_theirs()
    arrays_ours = arrays_theirs = _record(_initial())
    moved = 0.0
    for rnd in range(1, ROUNDS + 1):
        arrays_ours = _fedcore_round(ours, rnd, arrays_ours)
        arrays_theirs = _flower_round(theirs, rnd, arrays_theirs)
        a, b = _numpy(arrays_ours), _numpy(arrays_theirs)
        assert a.keys() == b.keys()
        for k in SHAPES:
            assert a[k].dtype == np.float32 and a[k].shape == SHAPES[k]
            np.testing.assert_allclose(
                a[k], b[k], rtol=1e-5, atol=2e-6, err_msg=f"{case} r{rnd} {k}"
            )
        moved = max(moved, max(float(np.abs(a[k] - _initial()[k]).max()) for k in SHAPES))
    assert moved > 1e-3  # the comparison is not between two unchanged models


def test_fedavg_one_round_by_hand():
    """Weighted mean of the steps: (sum n_i step_i) / sum n_i, checked on two clients."""
    x = {"w": np.array([1.0, 2.0], np.float32)}
    msgs = FedAvg().configure_train(1, _record(x), ConfigRecord(), [1, 2])
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": _record({"w": np.array(v, np.float32)}),
                    "metrics": MetricRecord({"num-examples": n}),
                }
            ),
            reply_to=m,
        )
        for m, v, n in zip(msgs, ([2.0, 2.0], [5.0, 6.0]), (1, 3), strict=True)
    ]
    agg = PlainExchange().aggregate(replies, arrays=_record(x))
    new = FedAvg().server_update(1, _record(x), agg)
    # (1 * [2, 2] + 3 * [5, 6]) / 4 = [4.25, 5.0]
    assert new["w"].numpy().tolist() == [4.25, 5.0]


@pytest.mark.parametrize("cls", [FedMedian, FedTrimmedAvg, Krum, MultiKrum])
def test_robust_strategies_ignore_the_outlier(cls):
    """The outlier moved everything by +3; the robust models stay near the honest ones."""
    ours = cls.from_config({"num-malicious-nodes": 1} if cls in (Krum, MultiKrum) else {})
    x = _record(_initial())
    new = _numpy(_fedcore_round(ours, 1, x))
    mean = _numpy(_fedcore_round(FedAvg(), 1, x))
    for k in SHAPES:
        robust = np.abs(new[k] - _initial()[k]).max()
        assert robust < 0.6, (cls.name, k, robust)
        assert np.abs(mean[k] - _initial()[k]).max() > 0.3  # FedAvg is pulled by 3 * 15/170


def test_fedavgm_momentum_by_hand():
    """beta = 0.5, eta = 1: steps u1, then u2 + 0.5 u1 (a constant update of 1 -> 1, 1.5)."""
    s = FedAvgM.from_config({"server-momentum": 0.5})
    x = _record({"w": np.zeros(1, np.float32)})
    for rnd, expected in ((1, 1.0), (2, 2.5), (3, 4.25)):
        msgs = s.configure_train(rnd, x, ConfigRecord(), [1, 2])
        cur = x["w"].numpy()
        replies = [
            Message(
                RecordDict(
                    {
                        "arrays": _record({"w": (cur + 1.0).astype(np.float32)}),
                        "metrics": MetricRecord({"num-examples": 3}),
                    }
                ),
                reply_to=m,
            )
            for m in msgs
        ]
        x = s.server_update(rnd, x, PlainExchange().aggregate(replies, arrays=x))
        assert x["w"].numpy().tolist() == [expected]
