"""Partitioners: disjoint, complete, deterministic, and skewed the way they promise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedcore.clientside.data import client_data, simulation_split
from fedcore.clientside.partition import dirichlet, iid, partition, shards
from fedcore.core.config import DataConfig
from fedcore.core.errors import ConfigError


def _assert_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "some example was lost or duplicated"
    assert np.array_equal(np.sort(allidx), np.arange(n))
    assert all(len(p) > 0 for p in parts)


@pytest.mark.property
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(20, 400),
    clients=st.integers(1, 20),
    classes=st.integers(2, 10),
    method=st.sampled_from(["iid", "dirichlet", "shards"]),
    alpha=st.floats(0.05, 10.0),
    seed=st.integers(0, 2**31),
)
def test_every_example_goes_to_exactly_one_client(n, clients, classes, method, alpha, seed):
    assume(method != "shards" or clients * 2 <= n)
    labels = np.random.default_rng(seed).integers(0, classes, n)
    parts = partition(labels, clients, method=method, rng=np.random.default_rng(seed), alpha=alpha)
    assert len(parts) == clients
    _assert_exact_cover(parts, n)


def test_same_seed_same_partition_other_seed_other():
    labels = np.repeat(np.arange(10), 30)
    a = dirichlet(labels, 10, 0.5, np.random.default_rng(1))
    b = dirichlet(labels, 10, 0.5, np.random.default_rng(1))
    c = dirichlet(labels, 10, 0.5, np.random.default_rng(2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_differ_by_at_most_one():
    parts = iid(103, 10, np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_shards_give_each_client_at_most_two_labels():
    labels = np.repeat(np.arange(10), 100)  # 1000 examples, 10 classes
    parts = shards(labels, 10, 2, np.random.default_rng(0))
    _assert_exact_cover(parts, 1000)
    # 20 shards of 50 label-sorted examples: each shard is one label
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert all(len(p) == 100 for p in parts)


def test_small_alpha_skews_more_than_large_alpha():
    labels = np.repeat(np.arange(10), 100)

    def mean_labels_per_client(alpha):
        parts = dirichlet(labels, 10, alpha, np.random.default_rng(0))
        # labels holding >= 5% of a client's data
        return np.mean(
            [np.sum(np.bincount(labels[p], minlength=10) >= 0.05 * len(p)) for p in parts]
        )

    assert mean_labels_per_client(0.1) < mean_labels_per_client(100.0)
    assert mean_labels_per_client(100.0) >= 9


def test_more_clients_than_examples_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        iid(5, 6, np.random.default_rng(0))
    assert info.value.key == "run.clients" and "at most 5" in str(info.value)


def test_too_many_shards_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        shards(np.zeros(10, dtype=int), 4, 3, np.random.default_rng(0))
    assert info.value.key == "data.shards-per-client"


def test_simulation_clients_hold_disjoint_parts_of_train_and_never_the_test_set():
    cfg = DataConfig(source="digits", partition="dirichlet", alpha=0.5)
    split = simulation_split(cfg, seed=0, num_clients=10)
    _assert_exact_cover(list(split.parts), len(split.train))
    assert len(split.train) + len(split.test) == 1797
    # a client's local train + val are exactly its partition
    for pid in (0, 9):
        own = client_data(cfg, seed=0, partition_id=pid, num_partitions=10)
        assert len(own.train) + len(own.val) == len(split.parts[pid])
        got = np.sort(np.concatenate([own.train.y, own.val.y]))
        assert np.array_equal(got, np.sort(split.train.y[split.parts[pid]]))
