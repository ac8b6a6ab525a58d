"""FedProx: the proximal term pulls the trained model toward the global one.

``mu/2 ||w - w_global||^2`` is added by ``TrainSettings.regularize``: in the built-in
loop, in a user's own train function that calls it, and through the handler when the
server's training message carries ``proximal-mu``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from torch import nn

from fedcore.clientside.handlers import _model as cached_model
from fedcore.clientside.handlers import handle_train, local_data, proximal_mu, run_config
from fedcore.clientside.training import TrainSettings, make_loader, train
from fedcore.core.config import to_flat
from fedcore.core.errors import ConfigError
from fedcore.core.records import model_to_arrays
from fedcore.strategies import FedProx


def _data(n=96, d=5, seed=0):
    from fedcore.clientside.data import Dataset

    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return Dataset(x, y, 2)


def _model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))


def _distance(model: nn.Module, start: dict[str, torch.Tensor]) -> float:
    return math.sqrt(
        sum(float(((p.detach() - start[n]) ** 2).sum()) for n, p in model.named_parameters())
    )


def _trained_distance(mu: float, train_fn=train) -> float:
    model = _model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrainSettings(epochs=5, batch_size=16, lr=0.05, momentum=0.5, seed=1)
    settings = settings.bind(model, proximal_mu=mu)
    train_fn(model, make_loader(_data(), batch_size=16, shuffle=True, seed=1), settings)
    assert settings.counter.regularized == 5 * 6  # once per batch
    return _distance(model, start)


def test_regularize_adds_mu_over_two_times_the_squared_distance_by_hand():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 0.0]]))
    settings = TrainSettings(epochs=1, batch_size=1, lr=0.1).bind(model, proximal_mu=0.5)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    loss = settings.regularize(model, torch.tensor(3.0))
    assert float(loss.detach()) == pytest.approx(3.0 + 0.25 * 5.0)  # 3 + 0.5/2 * (1 + 4)
    loss.backward()
    assert model.weight.grad.tolist() == [[0.5, 1.0]]  # mu * (w - w_global)


def test_mu_zero_changes_nothing():
    model = nn.Linear(2, 1)
    settings = TrainSettings(epochs=1, batch_size=1, lr=0.1).bind(model, proximal_mu=0.0)
    loss = torch.tensor(1.5)
    assert settings.regularize(model, loss) is loss and settings.global_params is None


def test_built_in_loop_the_larger_mu_the_closer_to_the_global_model():
    # lr / (1 - momentum) * mu stays below 2: the proximal pull itself is stable.
    free, mild, strong = (_trained_distance(mu) for mu in (0.0, 1.0, 10.0))
    assert free > mild > strong
    assert strong < 0.1 * free


def user_train(model: nn.Module, loader, settings: TrainSettings) -> dict[str, float]:
    """A user's own loop (torch.optim, its own loss) that calls the hook."""
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    loss_fn = nn.CrossEntropyLoss()
    loss = torch.tensor(0.0)
    for _ in range(settings.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            settings.regularize(model, loss).backward()
            settings.correct(model)
            opt.step()
    return {"train_loss": float(loss.detach())}


def test_user_train_function_gets_the_same_pull():
    free, strong = _trained_distance(0.0, user_train), _trained_distance(10.0, user_train)
    assert strong < 0.1 * free


def test_server_sends_proximal_mu_in_every_training_message():
    arrays = model_to_arrays(_model())
    msgs = FedProx.from_config({"proximal-mu": 0.3}).configure_train(
        2, arrays, ConfigRecord({"lr": 0.1}), [1, 2, 3]
    )
    assert len(msgs) == 3
    for m in msgs:
        cfg = m.content.config_records["config"]
        assert cfg["proximal-mu"] == 0.3 and cfg["lr"] == 0.1 and cfg["server-round"] == 2
    assert FedProx().train_config(1) == {"proximal-mu": 0.01}


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_client_refuses_a_bad_proximal_mu(bad):
    with pytest.raises(ConfigError) as info:
        proximal_mu({"proximal-mu": bad})
    assert info.value.key == "proximal-mu" and ">= 0" in info.value.allowed


# -- through the handler ------------------------------------------------------------------
def _context(cfg):
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 1, "num-partitions": cfg.run.clients},
        state=RecordDict(),
        run_config=to_flat(cfg),
    )


def _update_norm(ctx, mu: float) -> float:
    cfg = run_config(ctx)
    data = local_data(cfg, ctx.node_config)
    torch.manual_seed(0)
    model = cached_model(cfg, data.train.input_shape, data.train.num_classes)
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    arrays = model_to_arrays(model)
    (msg,) = FedProx.from_config({"proximal-mu": mu}).configure_train(
        1, arrays, ConfigRecord(), [7]
    )
    reply = handle_train(msg, ctx)
    trained = reply.content.array_records["arrays"]
    return math.sqrt(
        sum(float(((trained[k].numpy() - arrays[k].numpy()) ** 2).sum()) for k in arrays.keys())
    )


def test_handler_applies_the_servers_proximal_mu(small_config):
    ctx = _context(small_config.replace(train={"local-epochs": 3, "momentum": 0.0}))
    free, strong = _update_norm(ctx, 0.0), _update_norm(ctx, 8.0)  # lr * mu = 0.8
    assert strong < 0.2 * free, (free, strong)


def test_handler_refuses_a_negative_mu_from_the_server(small_config):
    ctx = _context(small_config)
    arrays = model_to_arrays(cached_model(run_config(ctx), *_shape(ctx)))
    (msg,) = FedProx().configure_train(1, arrays, ConfigRecord(), [7])
    msg.content.config_records["config"]["proximal-mu"] = -1.0
    with pytest.raises(ConfigError, match="proximal-mu"):
        handle_train(msg, ctx)


def _shape(ctx):
    data = local_data(run_config(ctx), ctx.node_config)
    return data.train.input_shape, data.train.num_classes


def ignores_hooks(model: nn.Module, loader, settings: TrainSettings) -> dict[str, float]:
    """A user loop that never calls settings.regularize."""
    return {"train_loss": 0.0}


def test_a_train_function_that_ignores_the_term_is_reported(small_config, caplog):
    cfg = small_config.replace(model={"train-fn": "tests.test_fedprox:ignores_hooks"})
    ctx = _context(cfg)
    arrays = model_to_arrays(cached_model(run_config(ctx), *_shape(ctx)))
    (msg,) = FedProx.from_config({"proximal-mu": 0.5}).configure_train(
        1, arrays, ConfigRecord(), [7]
    )
    with caplog.at_level(logging.WARNING, logger="fedcore"):
        handle_train(msg, ctx)
    assert "never called settings.regularize" in caplog.text
