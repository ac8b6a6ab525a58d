"""Partitioners: what mutation testing showed the suite did not pin down.

- Each part is a sorted ``int64`` index array (the module's promise).
- A partition is a pure function of its inputs *on every machine and in every version*:
  a client recomputes its part from the run seed when a run resumes, possibly under a
  newer fedcore (checkpoints of 0.1 resume), so the parts below are pinned. That covers
  the stable label sort of ``shards`` (a quicksort orders equal labels differently on
  different CPUs) and which of two equally large clients gives an example to an empty one.
- Limits are inclusive where the docs say so (one example per shard is enough) and every
  refusal is a ``ConfigError`` that names the key and the value and says what is allowed.
- ``partition``'s defaults are the ``[data]`` section's.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.clientside.partition import dirichlet, iid, partition, shards
from fedcore.core.config import DataConfig
from fedcore.core.errors import ConfigError

# 60 labels of 3 classes, in no order (shards cut inside each class's run)
_LABELS = np.array(
    [2, 1, 1, 0, 0, 0, 0, 0, 0, 2, 1, 2, 1, 1, 2, 2, 1, 1, 1, 2, 0, 2, 2, 0, 1, 2, 1, 0, 2, 2]
    + [2, 0, 0, 2, 0, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 2, 1, 1, 0, 1, 2, 1, 1, 2, 2, 2, 1, 2, 2, 1]
)


def _lists(parts):
    return [p.tolist() for p in parts]


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: iid(50, 4, rng),
        lambda rng: dirichlet(_LABELS, 5, 0.5, rng),
        lambda rng: shards(_LABELS, 3, 2, rng),
    ],
    ids=["iid", "dirichlet", "shards"],
)
def test_every_part_is_a_sorted_int64_index_array(make):
    for part in make(np.random.default_rng(3)):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)


def test_iid_parts_are_the_same_in_every_version():
    assert _lists(iid(10, 3, np.random.default_rng(0))) == [[2, 4, 6, 7], [3, 5, 9], [0, 1, 8]]


def test_dirichlet_parts_are_the_same_in_every_version_when_empty_clients_are_filled():
    # seed 0 leaves clients empty while clients 1 and 5 hold 4 examples each: the
    # example goes from the first of the largest
    labels = np.repeat(np.arange(3), 4)
    got = _lists(dirichlet(labels, 6, 0.1, np.random.default_rng(0)))
    assert got == [[6], [2, 8, 9, 10], [0], [5], [7], [1, 3, 4, 11]]


def test_shards_parts_are_the_same_on_every_machine():
    got = _lists(shards(_LABELS, 3, 2, np.random.default_rng(5)))
    assert got == [
        [0, 1, 9, 11, 14, 15, 19, 21, 22, 25, 28, 32, 34, 36, 37, 41, 42, 43, 44, 48],
        [2, 10, 12, 13, 16, 17, 18, 24, 26, 35, 38, 39, 40, 46, 47, 49, 51, 52, 56, 59],
        [3, 4, 5, 6, 7, 8, 20, 23, 27, 29, 30, 31, 33, 45, 50, 53, 54, 55, 57, 58],
    ]


def test_one_example_per_shard_is_enough():
    labels = np.arange(20) % 4
    parts = shards(labels, 10, 2, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(20))
    assert all(len(p) == 2 for p in parts)


def test_zero_clients_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as info:
        iid(10, 0, np.random.default_rng(0))
    assert (info.value.key, info.value.value) == ("run.clients", 0)
    assert str(info.value) == "config key 'run.clients' has value 0: must be an integer >= 1"


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_alpha_that_is_not_positive_is_refused_naming_the_key(alpha):
    with pytest.raises(ConfigError) as info:
        dirichlet(_LABELS, 3, alpha, np.random.default_rng(0))
    assert info.value.key == "data.alpha"
    assert str(info.value) == f"config key 'data.alpha' has value {alpha!r}: must be > 0"


def test_too_many_shards_says_how_many_and_what_to_do():
    with pytest.raises(ConfigError) as info:
        shards(np.zeros(10, dtype=int), 4, 3, np.random.default_rng(0))
    assert (info.value.key, info.value.value) == ("data.shards-per-client", 3)
    assert info.value.allowed == (
        "4 clients x 3 shards = 12 shards but only 10 examples; lower it or use fewer clients"
    )


def test_unknown_method_is_refused_with_the_choices():
    with pytest.raises(ConfigError) as info:
        partition(_LABELS, 3, method="random", rng=np.random.default_rng(0))
    assert str(info.value) == (
        "config key 'data.partition' has value 'random': must be one of iid, dirichlet, shards"
    )


def test_partition_defaults_are_the_data_sections():
    defaults = DataConfig()
    for method, direct in [
        ("dirichlet", lambda rng: dirichlet(_LABELS, 4, defaults.alpha, rng)),
        ("shards", lambda rng: shards(_LABELS, 4, defaults.shards_per_client, rng)),
    ]:
        got = partition(_LABELS, 4, method=method, rng=np.random.default_rng(9))
        assert _lists(got) == _lists(direct(np.random.default_rng(9))), method


def test_more_clients_than_examples_names_the_value_and_the_limit():
    with pytest.raises(ConfigError) as info:
        iid(5, 6, np.random.default_rng(0))
    assert (info.value.key, info.value.value) == ("run.clients", 6)
    assert info.value.allowed == (
        "more clients than training examples (5); every client needs at least one "
        "example: use at most 5 clients"
    )
