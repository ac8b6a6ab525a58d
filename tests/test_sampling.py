"""Client sampling: seeded by (seed, round, purpose), never by global RNG or id order."""

from __future__ import annotations

import random

import numpy as np

from fedcore.core.sampling import sample_clients, sample_size


def test_size_rule():
    assert sample_size(10, fraction=0.5, minimum=2) == 5
    assert sample_size(10, fraction=0.05, minimum=2) == 2
    assert sample_size(3, fraction=0.5, minimum=5) == 3
    assert sample_size(10, fraction=1.0, minimum=0) == 10


def test_deterministic_and_independent_of_global_rng_and_order():
    ids = list(range(100, 200))
    a = sample_clients(ids, fraction=0.1, minimum=1, seed=3, server_round=4)
    random.seed(999)
    np.random.seed(999)
    b = sample_clients(list(reversed(ids)), fraction=0.1, minimum=1, seed=3, server_round=4)
    assert a == b and len(a) == 10 and a == sorted(a)


def test_varies_with_round_seed_and_purpose():
    ids = range(1000)
    base = sample_clients(ids, fraction=0.1, minimum=1, seed=0, server_round=1)
    assert base != sample_clients(ids, fraction=0.1, minimum=1, seed=0, server_round=2)
    assert base != sample_clients(ids, fraction=0.1, minimum=1, seed=1, server_round=1)
    assert base != sample_clients(
        ids, fraction=0.1, minimum=1, seed=0, server_round=1, purpose="evaluate"
    )


def test_roughly_uniform_over_many_rounds():
    counts = np.zeros(20)
    for r in range(2000):
        for i in sample_clients(range(20), fraction=0.25, minimum=1, seed=0, server_round=r):
            counts[i] += 1
    expected = 2000 * 5 / 20
    assert np.all(np.abs(counts - expected) < 0.15 * expected)
