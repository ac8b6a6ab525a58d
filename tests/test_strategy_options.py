"""``[strategy.options]``: each strategy validates its own; state survives a checkpoint exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcore.core.errors import ConfigError
from fedcore.core.seeds import rng
from fedcore.serverside.exchange import PlainExchange
from fedcore.storage.files import arrays_from_safetensors, arrays_to_safetensors
from fedcore.strategies import STRATEGIES, Strategy, strategy_class

NODES = [1, 2, 3, 4]


def _error(name: str, options: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        strategy_class(name).from_config(options)
    return info.value


def test_every_builtin_builds_from_an_empty_table_with_its_documented_defaults():
    for name in STRATEGIES:
        s = strategy_class(name).from_config({}, seed=3)
        assert s.name == name and s.seed == 3
    assert strategy_class("fedtrimmedavg").from_config({}).options.beta == 0.2
    assert strategy_class("fedprox").from_config({}).options.proximal_mu == 0.01
    assert strategy_class("scaffold").from_config({}).options.server_learning_rate == 1.0
    assert strategy_class("krum").from_config({}).options.num_malicious_nodes == 0
    adam = strategy_class("fedadam").from_config({"eta": 0.1, "beta-2": 0.9, "eta-l": 1}).options
    assert (adam.eta, adam.beta_1, adam.beta_2, adam.eta_l) == (0.1, 0.9, 0.9, 1.0)


def test_unknown_option_names_the_key_and_suggests_the_near_miss():
    err = _error("fedadam", {"bta-1": 0.9})
    assert err.key == "strategy.options.bta-1"
    assert "did you mean 'strategy.options.beta-1'" in str(err)
    assert "beta-2" in err.allowed and "tau" in err.allowed  # the allowed keys are listed
    err = _error("fedavgm", {"server-lr": 0.5})
    assert err.key == "strategy.options.server-lr"
    assert "server-learning-rate" in str(err)


def test_strategy_without_options_refuses_any():
    err = _error("fedmedian", {"beta": 0.2})
    assert err.key == "strategy.options.beta" and "no options" in err.allowed


@pytest.mark.parametrize(
    ("name", "options", "key", "allowed"),
    [
        ("fedtrimmedavg", {"beta": 0.6}, "beta", "[0, 0.5)"),
        ("fedtrimmedavg", {"beta": -0.1}, "beta", "[0, 0.5)"),
        ("fedadam", {"eta": 0.0}, "eta", "> 0"),
        ("fedadam", {"eta": float("nan")}, "eta", "finite"),
        ("fedyogi", {"beta-2": 1.0}, "beta-2", "[0, 1)"),
        ("fedadagrad", {"tau": -1e-3}, "tau", "> 0"),
        ("fedavgm", {"server-momentum": 1.0}, "server-momentum", "[0, 1)"),
        ("fedavgm", {"server-learning-rate": float("inf")}, "server-learning-rate", "finite"),
        ("fedprox", {"proximal-mu": -0.01}, "proximal-mu", ">= 0"),
        ("scaffold", {"server-learning-rate": 0}, "server-learning-rate", "> 0"),
        ("krum", {"num-malicious-nodes": -1}, "num-malicious-nodes", ">= 0"),
        ("multikrum", {"num-nodes-to-select": -1}, "num-nodes-to-select", ">= 1, or 0"),
        ("scaffold", {"control-option": 3}, "control-option", "1 (option I) or 2"),
        ("scaffold", {"correction-weight": 0.0}, "correction-weight", "(0, 1]"),
        ("scaffold", {"correction-weight": 1.5}, "correction-weight", "(0, 1]"),
    ],
)
def test_bad_value_names_the_key_the_value_and_the_allowed_range(name, options, key, allowed):
    err = _error(name, options)
    assert err.key == f"strategy.options.{key}"
    assert allowed in err.allowed
    value = next(iter(options.values()))
    assert err.value == value or (value != value and err.value != err.value)  # NaN
    assert f"strategy.options.{key}" in str(err)


@pytest.mark.parametrize(
    ("name", "options", "allowed"),
    [
        ("fedadam", {"eta": "fast"}, "must be a number"),
        ("fedadam", {"eta": True}, "must be a number"),
        ("krum", {"num-malicious-nodes": 1.5}, "must be an integer"),
    ],
)
def test_wrong_type_is_refused(name, options, allowed):
    assert allowed in _error(name, options).allowed


def test_integers_are_accepted_for_float_options():
    assert strategy_class("fedavgm").from_config({"server-learning-rate": 1}).options == (
        strategy_class("fedavgm").Options(server_learning_rate=1.0)
    )


# -- strategy state across a checkpoint ------------------------------------------------
def _arrays(rnd: int = 0) -> ArrayRecord:
    g = rng(5, "options", rnd)
    return ArrayRecord(
        {
            "a": Array(g.normal(size=(3, 2)).astype(np.float32)),
            "b": Array(g.normal(size=(4,)).astype(np.float32)),
        }
    )


def _round(s: Strategy, rnd: int, arrays: ArrayRecord) -> ArrayRecord:
    msgs = s.configure_train(rnd, arrays, ConfigRecord(), NODES)
    summed = s.summed_records(arrays)
    replies = []
    for i, msg in enumerate(msgs):
        trained = _arrays(100 * rnd + i)
        extra = {name: _arrays(1000 * rnd + i) for name in summed}
        content = RecordDict(
            {
                "arrays": trained,
                "metrics": MetricRecord({"num-examples": 10 + i}),
                **extra,
            }
        )
        replies.append(Message(content, reply_to=msg))
    agg = PlainExchange().aggregate(replies, arrays=arrays, summed=summed, individual=not s.linear)
    return s.server_update(rnd, arrays, agg)


def _through_a_checkpoint(s: Strategy) -> tuple[dict, dict[str, np.ndarray]]:
    """state_dict via JSON, state_arrays via safetensors bytes (what the checkpoint does)."""
    state = json.loads(json.dumps(s.state_dict()))
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in s.state_arrays().items()})
    loaded = arrays_from_safetensors(arrays_to_safetensors(record)) if record else ArrayRecord()
    return state, {k: a.numpy() for k, a in loaded.items()}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_round_trips_and_a_restored_strategy_continues_bit_identically(name):
    cls = strategy_class(name)
    original = cls.from_config({})
    arrays = _arrays()
    for rnd in (1, 2):
        arrays = _round(original, rnd, arrays)
    restored = cls.from_config({})
    restored.load_state(*_through_a_checkpoint(original))
    before = original.state_arrays()
    after = restored.state_arrays()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and np.array_equal(before[k], after[k]), k
    if name in {"fedavgm", "fedadagrad", "fedadam", "fedyogi", "scaffold"}:
        assert before, f"{name} has optimizer state after two rounds"
    ours, theirs = _round(original, 3, arrays), _round(restored, 3, arrays)
    for k in ours.keys():
        assert ours[k].numpy().tobytes() == theirs[k].numpy().tobytes(), (name, k)


def test_a_stateless_strategy_refuses_foreign_state():
    with pytest.raises(ValueError, match="has no state"):
        strategy_class("fedavg").from_config({}).load_state({}, {"m.a": np.zeros(1)})
