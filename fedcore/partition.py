"""Partitioners: split example indices among clients, every example to exactly one.

All are pure functions of (labels, number of clients, parameters, a NumPy
``Generator``) and return one sorted ``int64`` index array per client. Their
union is ``range(len(labels))`` and they are pairwise disjoint::

    >>> import numpy as np
    >>> parts = iid(10, 3, np.random.default_rng(0))
    >>> sorted(np.concatenate(parts).tolist()) == list(range(10))
    True

- :func:`iid`: a seeded shuffle cut into near-equal parts.
- :func:`dirichlet`: label skew; each class is spread over clients with proportions
  drawn from Dirichlet(alpha) (Hsu et al. 2019, arXiv:1909.06335).
- :func:`shards`: the pathological non-IID split of McMahan et al. 2017
  (arXiv:1602.05629): sort by label, cut into ``clients * shards_per_client``
  shards, give each client ``shards_per_client`` of them at random.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, DataError

__all__ = ["dirichlet", "iid", "partition", "shards"]

_MAX_DIRICHLET_TRIES = 1000


def _check_counts(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError("run.clients", num_clients, "must be an integer >= 1")
    if num_clients > num_examples:
        raise ConfigError(
            "run.clients",
            num_clients,
            f"more clients than training examples ({num_examples}); every client needs at "
            f"least one example: use at most {num_examples} clients",
        )


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and cut into ``num_clients`` parts whose sizes differ by at most one."""
    _check_counts(num_examples, num_clients)
    perm = rng.permutation(num_examples)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, num_clients)]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed split: class ``c``'s examples go to clients in Dirichlet(alpha) shares.

    Draws are repeated (from the same generator, so still deterministic) until every
    client holds at least one example.
    """
    labels = np.asarray(labels)
    _check_counts(len(labels), num_clients)
    if not alpha > 0:
        raise ConfigError("data.alpha", alpha, "must be > 0")
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(_MAX_DIRICHLET_TRIES):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for client, part in enumerate(np.split(idx, cuts)):
                buckets[client].append(part)
        parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        if min(len(p) for p in parts) > 0:
            return parts
    raise DataError(
        f"Dirichlet(alpha={alpha}) left a client with no examples in "
        f"{_MAX_DIRICHLET_TRIES} draws ({len(labels)} examples, {num_clients} clients); "
        "raise data.alpha or use fewer clients"
    )


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: each client gets ``shards_per_client`` shards."""
    labels = np.asarray(labels)
    num_shards = num_clients * shards_per_client
    _check_counts(len(labels), num_clients)
    if num_shards > len(labels):
        raise ConfigError(
            "data.shards-per-client",
            shards_per_client,
            f"{num_clients} clients x {shards_per_client} shards = {num_shards} shards but "
            f"only {len(labels)} examples; lower it or use fewer clients",
        )
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [
        np.sort(np.concatenate([pieces[s] for s in row])).astype(np.int64) for row in assignment
    ]


def partition(
    labels: np.ndarray,
    num_clients: int,
    *,
    method: str,
    rng: np.random.Generator,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Dispatch to the partitioner named ``method`` (``iid``, ``dirichlet``, ``shards``)."""
    if method == "iid":
        return iid(len(labels), num_clients, rng)
    if method == "dirichlet":
        return dirichlet(labels, num_clients, alpha, rng)
    if method == "shards":
        return shards(labels, num_clients, shards_per_client, rng)
    raise ConfigError("data.partition", method, "must be one of iid, dirichlet, shards")
