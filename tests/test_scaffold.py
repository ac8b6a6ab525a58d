"""SCAFFOLD against a direct implementation, on a problem whose optimum is known.

Four heterogeneous clients hold least-squares losses
``f_i(w) = 1/(2 m_i) ||A_i w - b_i||^2`` (``m_i`` rows, weight ``n_i = m_i``), so the
optimum of ``sum_i n_i f_i`` is the least-squares solution of the stacked system.
Clients take ``K`` exact (full-batch) gradient steps in a user train function that
calls ``settings.correct(model)``; everything else is fedcore's own code, as the
handler runs it: ``ScaffoldClient`` (reads ``c`` from the message and ``c_i`` from
the client state, applies option II, stores ``c_i+``), ``PlainExchange`` (sums the
``scaffold.delta-c`` records like the update) and ``Scaffold.server_update``. The
result matches a 30-line NumPy reference step for step, reaches the optimum, and
FedAvg with the same local steps does not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from fedcore.clientside.handlers import (
    CONTROL,
    CONTROL_DELTA,
    SCAFFOLD_OPTION,
    SCAFFOLD_WEIGHT,
    ScaffoldClient,
    handle_train,
    scaffold_option,
    scaffold_weight,
)
from fedcore.clientside.state import ClientState
from fedcore.clientside.training import (
    TrainSettings,
    control_variate_update,
    make_loader,
    step_size_sum,
)
from fedcore.core.config import to_flat
from fedcore.core.errors import ConfigError, ModelError
from fedcore.core.records import load_arrays, model_to_arrays
from fedcore.core.seeds import derive_seed, rng
from fedcore.serverside.exchange import PlainExchange
from fedcore.serverside.strategies import scaffold as server_scaffold
from fedcore.strategies import FedAvg, Sampling, Scaffold

D = 6
ROWS = [8, 20, 12, 30]  # m_i = n_i
NODES = [11, 12, 13, 14]
K = 10


def _problem():
    g = rng(3, "scaffold", "problem")
    clients = []
    for i, m in enumerate(ROWS):
        scale = np.diag(np.linspace(0.6, 1.5, D)[:: (-1) ** i])  # different curvature
        a = g.normal(size=(m, D)) @ scale
        b = a @ g.normal(loc=3.0 * (i - 1.5), size=D) + 0.1 * g.normal(size=m)  # own optimum
        clients.append((a, b))
    a_all = np.vstack([a for a, _ in clients])
    b_all = np.concatenate([b for _, b in clients])
    optimum = np.linalg.lstsq(a_all, b_all, rcond=None)[0]
    smooth = max(np.linalg.eigvalsh(a.T @ a / len(a)).max() for a, _ in clients)
    return clients, optimum, 0.5 / smooth


def _grad(a, b, w):
    return a.T @ (a @ w - b) / len(a)


def reference(
    clients, x, lr, rounds, *, option=1, weight=1.0, eta_g=1.0, sampled=None, n_total=None
):
    """SCAFFOLD, Karimireddy et al. 2020, Algorithm 1, option I or II (example-weighted).

    ``weight`` scales the correction (1 in the paper).
    """
    n_total = n_total or len(clients)
    c = np.zeros(D)
    c_i = [np.zeros(D) for _ in clients]
    history = []
    for r in range(rounds):
        chosen = sampled[r] if sampled else range(len(clients))
        dy, dc, weights = [], [], []
        for i in chosen:
            a, b = clients[i]
            y = x.copy()
            for _ in range(K):
                y -= lr * (_grad(a, b, y) + weight * (c - c_i[i]))
            drift = weight * (c_i[i] - c) + (x - y) / (K * lr)
            new = _grad(a, b, x) if option == 1 else drift
            dy.append(y - x)
            dc.append(new - c_i[i])
            c_i[i] = new
            weights.append(len(a))
        w = np.array(weights, float) / sum(weights)
        x = x + eta_g * sum(wi * d for wi, d in zip(w, dy, strict=True))
        c = c + len(chosen) / n_total * sum(wi * d for wi, d in zip(w, dc, strict=True))
        history.append((x.copy(), c.copy()))
    return history


def quadratic_train(a, b):
    """A user's train function: K full-batch steps of SGD, both strategy hooks called."""
    at, bt = torch.from_numpy(a), torch.from_numpy(b)

    def train(model: nn.Module, loader, settings: TrainSettings) -> dict[str, float]:
        (w,) = model.parameters()
        for _ in range(K):
            w.grad = None
            loss = 0.5 * ((at @ w.reshape(-1) - bt) ** 2).sum() / len(at)
            settings.regularize(model, loss).backward()
            settings.correct(model)
            with torch.no_grad():
                w -= settings.lr * w.grad
        return {"train_loss": float(loss.detach())}

    return train


def _model(x: np.ndarray) -> nn.Module:
    model = nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(x.reshape(1, D)))
    return model


def fedcore_rounds(clients, x0, lr, rounds, tmp_path, *, strategy, scaffold=True):
    """The fedcore pipeline: configure_train -> clients -> PlainExchange -> server_update."""
    arrays = model_to_arrays(_model(x0))
    stores = [ClientState(tmp_path / f"client-{i}") for i in range(len(clients))]
    history, sampled = [], []
    for rnd in range(1, rounds + 1):
        msgs = strategy.configure_train(rnd, arrays, ConfigRecord({"lr": lr}), NODES)
        sampled.append([NODES.index(m.metadata.dst_node_id) for m in msgs])
        replies = []
        for msg in msgs:
            i = NODES.index(msg.metadata.dst_node_id)
            model = _model(x0)
            model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
            settings = TrainSettings(epochs=1, batch_size=1, lr=lr)
            client = None
            if scaffold:
                client = ScaffoldClient.start(
                    msg.content.array_records[CONTROL],
                    msg.content["arrays"],
                    stores[i],
                    rnd,
                    option=scaffold_option(msg.content.config_records["config"]),
                    weight=scaffold_weight(msg.content.config_records["config"]),
                )
                settings = settings.bind(model, correction=client.correction(model))
            else:
                settings = settings.bind(model)
            quadratic_train(*clients[i])(model, None, settings)
            assert settings.local_steps == K
            trained = model_to_arrays(model)
            content = {"arrays": trained, "metrics": MetricRecord({"num-examples": ROWS[i]})}
            if client is not None:
                content[CONTROL_DELTA] = client.finish(model, trained, settings, stores[i], rnd)
            replies.append(Message(RecordDict(content), reply_to=msg))
        agg = PlainExchange().aggregate(
            replies, arrays=arrays, summed=strategy.summed_records(arrays)
        )
        assert agg.num_clients == len(msgs) and not agg.rejected
        arrays = strategy.server_update(rnd, arrays, agg)
        c = strategy.control["weight"].reshape(-1).copy() if scaffold else None
        history.append((arrays["weight"].numpy().reshape(-1).copy(), c))
    return history, sampled


def test_record_names_agree_between_client_and_server():
    assert (CONTROL, CONTROL_DELTA, SCAFFOLD_OPTION, SCAFFOLD_WEIGHT) == (
        server_scaffold.CONTROL,
        server_scaffold.CONTROL_DELTA,
        server_scaffold.OPTION,
        server_scaffold.WEIGHT,
    )


def test_option_and_weight_travel_in_the_training_config_and_are_checked():
    arrays = model_to_arrays(_model(np.zeros(D)))
    for option, weight in ((1, 0.5), (2, 1.0)):
        s = Scaffold.from_config({"control-option": option, "correction-weight": weight})
        (msg,) = s.configure_train(1, arrays, ConfigRecord(), [1])
        conf = msg.content.config_records["config"]
        assert (scaffold_option(conf), scaffold_weight(conf)) == (option, weight)
    assert (scaffold_option({}), scaffold_weight({})) == (1, 1.0)  # the paper's, when absent
    for bad in (0, 3, True, "1"):
        with pytest.raises(ConfigError, match="scaffold-option"):
            scaffold_option({SCAFFOLD_OPTION: bad})
    for bad in (0.0, 1.5, float("nan"), -1, True):
        with pytest.raises(ConfigError, match="scaffold-correction-weight"):
            scaffold_weight({SCAFFOLD_WEIGHT: bad})


@pytest.mark.parametrize("option", [1, 2])
@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_matches_the_reference_step_for_step(tmp_path, option, weight):
    clients, _, lr = _problem()
    x0 = np.zeros(D)
    strategy = Scaffold.from_config({"control-option": option, "correction-weight": weight})
    ours, _ = fedcore_rounds(clients, x0, lr, 30, tmp_path, strategy=strategy)
    ref = reference(clients, x0, lr, 30, option=option, weight=weight)
    for r, ((x, c), (x_ref, c_ref)) in enumerate(zip(ours, ref, strict=True)):
        np.testing.assert_allclose(x, x_ref, rtol=1e-9, atol=1e-9, err_msg=f"x round {r + 1}")
        np.testing.assert_allclose(c, c_ref, rtol=1e-9, atol=1e-9, err_msg=f"c round {r + 1}")


def _error(clients, optimum, lr, tmp_path, strategy, *, scaffold=True, rounds=60):
    x0 = np.zeros(D)
    history, _ = fedcore_rounds(
        clients, x0, lr, rounds, tmp_path, strategy=strategy, scaffold=scaffold
    )
    return np.linalg.norm(history[-1][0] - optimum) / np.linalg.norm(x0 - optimum)


@pytest.mark.parametrize("option", [1, 2])
def test_the_papers_scaffold_reaches_the_optimum_and_fedavg_does_not(tmp_path, option):
    clients, optimum, lr = _problem()
    paper = Scaffold.from_config({"control-option": option, "correction-weight": 1.0})
    scaffold_error = _error(clients, optimum, lr, tmp_path / "s", paper)
    assert scaffold_error < 1e-6, scaffold_error
    # Client drift: FedAvg's fixed point with K local steps is not the optimum.
    fedavg_error = _error(clients, optimum, lr, tmp_path / "f", FedAvg(), scaffold=False)
    assert fedavg_error > 1e-2 and fedavg_error > 1e4 * scaffold_error, fedavg_error
    # The default half-weight correction removes part of the drift: in between.
    half = _error(clients, optimum, lr, tmp_path / "h", Scaffold.from_config({}))
    assert scaffold_error < half < 0.75 * fedavg_error, (half, fedavg_error)


@pytest.mark.parametrize("option", [1, 2])
def test_partial_participation_scales_the_control_update_by_s_over_n(tmp_path, option):
    clients, _, lr = _problem()
    x0 = np.ones(D)
    strategy = Scaffold.from_config(
        {"server-learning-rate": 0.8, "control-option": option, "correction-weight": 0.7},
        seed=4,
        sampling=Sampling(fraction_train=0.5),
    )
    ours, sampled = fedcore_rounds(clients, x0, lr, 8, tmp_path, strategy=strategy)
    assert all(len(s) == 2 for s in sampled) and len({tuple(s) for s in sampled}) > 1
    ref = reference(
        clients,
        x0,
        lr,
        8,
        option=option,
        weight=0.7,
        eta_g=0.8,
        sampled=sampled,
        n_total=len(NODES),
    )
    for (x, c), (x_ref, c_ref) in zip(ours, ref, strict=True):
        np.testing.assert_allclose(x, x_ref, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(c, c_ref, rtol=1e-9, atol=1e-9)


def test_client_state_keeps_c_i_per_round_and_a_rerun_reads_the_same_one(tmp_path):
    """A re-run of round r (server restarted) starts from the round-(r-1) c_i again."""
    clients, _, lr = _problem()
    fedcore_rounds(clients, np.zeros(D), lr, 3, tmp_path, strategy=Scaffold())
    store = ClientState(tmp_path / "client-0")
    assert store.versions("scaffold") == [2, 3]
    r2, r3 = store.load("scaffold", 3), store.load("scaffold", 4)
    assert not np.array_equal(r2["weight"], r3["weight"])
    assert r2["weight"].dtype == np.float64 and r2["weight"].shape == (1, D)


def test_option_two_is_exact_for_a_constant_gradient_with_momentum():
    """(x - y) / step_size_sum recovers g exactly after K heavy-ball steps on a linear loss."""
    g = np.array([0.3, -1.2, 2.0])
    for momentum in (0.0, 0.5, 0.9):
        w = np.zeros(3)
        buf = None
        for _ in range(7):
            buf = g.copy() if buf is None else momentum * buf + g
            w -= 0.05 * buf
        s = step_size_sum(0.05, momentum, 7)
        new, delta = control_variate_update(
            {"w": np.zeros(3)}, {"w": np.zeros(3)}, {"w": np.zeros(3)}, {"w": w}, step_sum=s
        )
        np.testing.assert_allclose(new["w"], g, rtol=1e-12)
        np.testing.assert_allclose(delta["w"], g, rtol=1e-12)


def test_server_sends_c_like_the_model_and_sums_delta_c():
    arrays = ArrayRecord(
        {"w": Array(np.ones((2, 2), np.float32)), "steps": Array(np.array(3, np.int64))}
    )
    s = Scaffold()
    (msg,) = s.configure_train(1, arrays, ConfigRecord(), [5])
    c = msg.content.array_records[CONTROL]
    assert {k: (a.numpy().dtype, a.numpy().shape) for k, a in c.items()} == {
        "w": (np.float32, (2, 2)),
        "steps": (np.int64, ()),
    }
    assert not c["w"].numpy().any()
    spec = s.summed_records(arrays)[CONTROL_DELTA]
    assert spec["w"].shape == (2, 2) and spec["steps"].dtype == "int64"


# -- the handler, with a real Context ----------------------------------------------------
def _context(cfg, tmp_path, partition=0):
    return Context(
        run_id=1,
        node_id=500 + partition,
        node_config={
            "partition-id": partition,
            "num-partitions": cfg.run.clients,
            "state-dir": str(tmp_path / f"state-{partition}"),
        },
        state=RecordDict(),
        run_config=to_flat(cfg),
    )


def _train_message(cfg, arrays, rnd, strategy):
    (msg,) = strategy.configure_train(rnd, arrays, ConfigRecord(), [500])
    return msg


@pytest.mark.parametrize("option", [1, 2])
def test_handler_replies_delta_c_and_persists_c_i(tmp_path, small_config, option):
    from fedcore.clientside.handlers import _model as cached_model
    from fedcore.clientside.handlers import local_data, run_config

    ctx = _context(small_config, tmp_path)
    cfg = run_config(ctx)
    data = local_data(cfg, ctx.node_config)
    model = cached_model(cfg, data.train.input_shape, data.train.num_classes)
    arrays = model_to_arrays(model)
    strategy = Scaffold.from_config({"control-option": option})
    reply = handle_train(_train_message(cfg, arrays, 1, strategy), ctx)
    delta = reply.content.array_records[CONTROL_DELTA]
    trained = reply.content.array_records["arrays"]
    assert list(delta.keys()) == list(arrays.keys())
    for name in arrays.keys():
        assert delta[name].numpy().dtype == arrays[name].numpy().dtype
        assert delta[name].numpy().shape == arrays[name].numpy().shape
    name = next(iter(arrays.keys()))
    # First round: c = c_i = 0, so delta-c = c_i+ exactly as documented.
    if option == 2:  # (x - y) / step_size_sum
        steps = cfg.train.local_epochs * -(-len(data.train) // cfg.train.batch_size)
        s = step_size_sum(cfg.train.lr, cfg.train.momentum, steps)
        expected = (arrays[name].numpy().astype(float) - trained[name].numpy()) / s
    else:  # the gradient of the first minibatch, at the global model
        seed = derive_seed(cfg.run.seed, "train", 1, 0)
        loader = make_loader(data.train, batch_size=cfg.train.batch_size, shuffle=True, seed=seed)
        xb, yb = next(iter(loader))
        load_arrays(model, arrays)
        model.zero_grad()
        nn.CrossEntropyLoss()(model(xb), yb).backward()
        expected = dict(model.named_parameters())[name].grad.numpy().astype(float)
    np.testing.assert_allclose(delta[name].numpy(), expected, rtol=1e-4, atol=1e-6)
    store = ClientState(tmp_path / "state-0")
    assert store.versions("scaffold") == [1]
    np.testing.assert_allclose(store.load("scaffold", 2)[name], expected, rtol=1e-4, atol=1e-6)

    # Round 2 uses c_i from round 1: the correction changes the trained model.
    again = handle_train(_train_message(cfg, arrays, 2, strategy), ctx)
    first = reply.content.array_records["arrays"][name].numpy()
    assert not np.array_equal(again.content.array_records["arrays"][name].numpy(), first)
    assert store.versions("scaffold") == [1, 2]


def test_a_train_function_that_never_corrects_is_refused():
    settings = TrainSettings(epochs=1, batch_size=1, lr=0.1).bind(nn.Linear(2, 1))
    client = ScaffoldClient(
        control={"weight": np.zeros((1, 2))},
        local={"weight": np.zeros((1, 2))},
        global_arrays={"weight": np.zeros((1, 2))},
        dtypes={"weight": np.dtype(np.float32)},
    )
    with pytest.raises(ModelError, match="settings.correct"):
        client.finish(
            nn.Linear(2, 1), ArrayRecord(), settings, ClientState(records=RecordDict()), 1
        )


def test_a_control_variate_that_does_not_match_the_model_is_refused():
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    bad = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    with pytest.raises(ModelError, match="scaffold.c"):
        ScaffoldClient.start(bad, arrays, ClientState(records=RecordDict()), 1)
