"""Config validation at its edges: every cross-key rule, every refusal's words.

Mutation testing of ``fedcore.core.config``'s validation (the sections' cross-checks,
``Config.validate`` and the readers of raw values) found its limits unpinned: here each
rule is checked on both sides of its boundary, and each refusal is checked for the text
the user reads (key, value, what is allowed, how to fix it).
"""

from __future__ import annotations

import warnings

import pytest

from fedcore.core.config import SECTIONS, config_from_dict, config_from_flat
from fedcore.core.errors import ConfigError


def _refused(raw):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return str(info.value)


def _ok(raw):
    return config_from_dict(raw)


# ---------------------------------------------------------------- across sections


def test_minimum_clients_may_equal_the_clients_but_not_exceed_them():
    _ok({"run": {"clients": 10}, "round": {"min-available-clients": 10}})
    _ok({"run": {"clients": 10}, "strategy": {"min-train-clients": 10}})
    assert _refused({"round": {"min-available-clients": 11}}) == (
        "config key 'round.min-available-clients' has value 11: must be <= run.clients (10)"
    )
    assert _refused({"strategy": {"min-train-clients": 11}}) == (
        "config key 'strategy.min-train-clients' has value 11: must be <= run.clients (10)"
    )


def test_secure_aggregation_needs_three_clients():
    _ok({"run": {"clients": 3}})
    _ok({"run": {"clients": 2}, "secagg": {"enabled": False}})
    assert _refused({"run": {"clients": 2}}) == (
        "config key 'secagg.enabled' has value True: secure aggregation needs at least 3 "
        "clients per round, run.clients is 2: use more clients or set [secagg] enabled = false"
    )


# ---------------------------------------------------------------- [secagg]


@pytest.mark.parametrize(
    ("neighbours", "threshold"), [(0, 0), (0, 5), (4, 0), (4, 3), (4, 4), (5, 3), (7, 4)]
)
def test_thresholds_that_are_a_majority_of_the_neighbours_or_auto_are_accepted(
    neighbours, threshold
):
    cfg = _ok({"secagg": {"neighbours": neighbours, "threshold": threshold}})
    assert (cfg.secagg.neighbours, cfg.secagg.threshold) == (neighbours, threshold)


def test_a_threshold_above_the_neighbours_is_refused():
    assert _refused({"secagg": {"neighbours": 4, "threshold": 5}}) == (
        "config key 'secagg.threshold' has value 5: must be <= secagg.neighbours (4)"
    )


@pytest.mark.parametrize(("neighbours", "threshold"), [(4, 2), (6, 3), (8, 2), (9, 4)])
def test_a_threshold_of_half_the_neighbours_or_less_is_refused(neighbours, threshold):
    assert _refused({"secagg": {"neighbours": neighbours, "threshold": threshold}}) == (
        f"config key 'secagg.threshold' has value {threshold}: must be > secagg.neighbours / 2 "
        f"({neighbours} / 2): with t <= k/2 a server can split a client's neighbours in two "
        "and unmask it (or set 0 = auto, a majority)"
    )


@pytest.mark.parametrize(("ring", "top"), [(32, 24), (64, 56), (0, 56)])
def test_quantization_bits_up_to_what_the_ring_holds_are_accepted(ring, top):
    _ok({"secagg": {"ring-bits": ring, "bits": top}})
    _ok({"secagg": {"ring-bits": ring, "bits": 2}})


def test_quantization_bits_beyond_a_32_bit_ring_are_refused():
    assert _refused({"secagg": {"ring-bits": 32, "bits": 25}}) == (
        "config key 'secagg.bits' has value 25: must be in [2, 24] for ring-bits = 32 "
        "(the ring must also hold the total example count: N * 2^(bits-1) < 2^(ring-bits-1))"
    )


# ---------------------------------------------------------------- [train] and [data]


def test_the_clients_own_bounds_are_inclusive():
    _ok({"train": {"lr": 0.5, "min-lr": 0.5, "max-lr": 0.5}})
    _ok({"train": {"local-epochs": 3, "max-local-epochs": 3}})
    _ok({"train": {"local-epochs": 1, "batch-size": 1}})
    _ok({"train": {"batch-size": 64, "max-batch-size": 64}})


@pytest.mark.parametrize(
    ("train", "message"),
    [
        (
            {"min-lr": 1.0, "max-lr": 0.5},
            "'train.min-lr' has value 1.0: must be <= train.max-lr (0.5)",
        ),
        ({"lr": 20.0}, "'train.lr' has value 20.0: must be in [1e-06, 10] (this client's bounds)"),
        ({"lr": 1e-7}, "'train.lr' has value 1e-07: must be in [1e-06, 10] (this client's bounds)"),
        (
            {"local-epochs": 4, "max-local-epochs": 3},
            "'train.local-epochs' has value 4: must be in [1, 3] (this client's bounds)",
        ),
        (
            {"batch-size": 65, "max-batch-size": 64},
            "'train.batch-size' has value 65: must be in [1, 64] (this client's bounds)",
        ),
    ],
)
def test_values_outside_the_clients_bounds_are_refused(train, message):
    assert _refused({"train": train}) == "config key " + message


def test_a_data_file_needs_its_path():
    _ok({"data": {"source": "file", "path": "x.npz"}})
    assert _refused({"data": {"source": "file"}}) == (
        "config key 'data.path' has value '': data.source = 'file' needs data.path: "
        "a .npz (arrays 'x', 'y') or .csv file"
    )


# ---------------------------------------------------------------- reading raw values


def test_the_root_and_each_section_must_be_tables():
    assert _refused(5) == "config key '<root>' has value 5: a config must be a table of sections"
    assert _refused({"run": 5}) == "config key 'run' has value 5: must be a table [run]"


def test_an_unknown_section_is_refused_with_a_near_miss_if_any():
    allowed = ", ".join(SECTIONS)
    assert _refused({"rnu": {}}) == (
        f"config key 'rnu' has value {{}}: unknown section; did you mean 'run'? "
        f"allowed sections: {allowed}"
    )
    assert _refused({"zzzz": {}}) == (
        f"config key 'zzzz' has value {{}}: unknown section; allowed sections: {allowed}"
    )


def test_an_unknown_key_gets_the_nearest_key_here_or_elsewhere():
    run_keys = (
        "baseline-epochs, centralized-baseline, clients, mlflow, mlflow-tracking-uri, "
        "out-dir, rounds, seed, tensorboard"
    )
    assert _refused({"run": {"roundz": 1}}) == (
        "config key 'run.roundz' has value 1: unknown key; did you mean 'run.rounds'? "
        f"[run] accepts {run_keys}"
    )
    assert _refused({"run": {"alpha": 0.1}}) == (
        "config key 'run.alpha' has value 0.1: unknown key; did you mean 'data.alpha'? "
        f"[run] accepts {run_keys}"
    )
    assert _refused({"run": {"zzzz": 1}}) == (
        f"config key 'run.zzzz' has value 1: unknown key; [run] accepts {run_keys}"
    )


def test_a_near_miss_of_a_renamed_key_points_at_its_new_name():
    message = _refused({"strategy": {"round-timeot": 5.0}})
    assert "unknown key; did you mean 'round.timeout'? [strategy] accepts" in message


def test_a_renamed_key_is_read_as_the_new_one_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'strategy.round-timeout' is deprecated"):
        cfg = config_from_dict({"strategy": {"round-timeout": 5.0}})
    assert cfg.round.timeout == 5.0


def test_a_renamed_key_next_to_its_new_name_is_refused():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        message = _refused({"strategy": {"round-timeout": 5.0}, "round": {"timeout": 9.0}})
    assert message == (
        "config key 'strategy.round-timeout' has value 5.0: is the old spelling of "
        "'round.timeout', which is also given (9.0); keep only 'round.timeout'"
    )


def test_a_renamed_key_whose_new_section_is_not_a_table_is_refused():
    message = _refused({"strategy": {"round-timeout": 5.0}, "round": 5})
    assert message == "config key 'round' has value 5: must be a table [round]"


def test_flat_keys_that_make_a_scalar_a_table_are_refused():
    with pytest.raises(ConfigError) as info:
        config_from_flat({"model.kwargs": 5, "model.kwargs.hidden": 3})
    assert str(info.value) == (
        "config key 'model.kwargs.hidden' has value 3: conflicts with scalar key 'kwargs'"
    )
    cfg = config_from_flat({"model.kwargs.hidden": 3, "run.rounds": 2})
    assert dict(cfg.model.kwargs) == {"hidden": 3} and cfg.run.rounds == 2
