"""Client sampling: what mutation testing showed the suite did not pin down.

- A sample is drawn *without replacement*: ``k`` distinct clients, never one twice.
- The draw is part of the resume contract: checkpoints hold no RNG state (see
  ``fedcore.serverside.checkpoint``), so the clients picked for (seed, round, purpose)
  must be the same in every fedcore version that can resume the run. The values below
  are the draws of today's derivation (``rng(seed, "sample", purpose, round)``); a change
  to it breaks the resume of every existing run directory and must be deliberate.
- ``purpose`` defaults to ``"train"``.
"""

from __future__ import annotations

import doctest

import pytest

import fedcore.core.sampling
from fedcore.core.sampling import sample_clients


@pytest.mark.parametrize("seed", range(5))
def test_a_sample_never_names_a_client_twice(seed):
    for server_round in range(1, 60):
        picked = sample_clients(
            range(30), fraction=0.5, minimum=1, seed=seed, server_round=server_round
        )
        assert len(picked) == 15
        assert len(set(picked)) == 15, f"round {server_round}: {picked} repeats a client"


@pytest.mark.parametrize(
    ("ids", "fraction", "minimum", "seed", "server_round", "purpose", "expected"),
    [
        ([5, 3, 9, 1], 0.5, 1, 0, 1, "train", [3, 9]),
        (range(100), 0.1, 1, 7, 3, "train", [0, 1, 2, 4, 24, 51, 79, 82, 87, 97]),
        (range(100), 0.1, 1, 7, 3, "evaluate", [3, 37, 61, 62, 65, 71, 75, 84, 87, 88]),
        (range(10, 60), 0.2, 2, 123, 40, "train", [18, 19, 22, 27, 29, 33, 40, 47, 50, 52]),
    ],
)
def test_the_draw_of_a_round_is_the_same_in_every_version(
    ids, fraction, minimum, seed, server_round, purpose, expected
):
    got = sample_clients(
        ids,
        fraction=fraction,
        minimum=minimum,
        seed=seed,
        server_round=server_round,
        purpose=purpose,
    )
    assert got == expected


def test_purpose_defaults_to_train():
    kwargs = dict(fraction=0.1, minimum=1, seed=7, server_round=3)
    assert sample_clients(range(100), **kwargs) == sample_clients(
        range(100), **kwargs, purpose="train"
    )


def test_the_module_docstring_example_holds():
    failures, tried = doctest.testmod(fedcore.core.sampling, verbose=False)
    assert tried >= 1 and failures == 0
