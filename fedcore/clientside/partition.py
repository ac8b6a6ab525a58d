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

from fedcore.core.errors import ConfigError

__all__ = ["dirichlet", "iid", "partition", "shards"]


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

    A client left empty by the draw (likely with small ``alpha`` and many clients)
    receives one example taken at random from the currently largest client, so every
    client holds at least one example while the skew is kept.
    """
    labels = np.asarray(labels)
    _check_counts(len(labels), num_clients)
    if not alpha > 0:
        raise ConfigError("data.alpha", alpha, "must be > 0")
    buckets: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
        for client, part in enumerate(np.split(idx, cuts)):
            buckets[client].extend(part.tolist())
    for client in range(num_clients):
        if not buckets[client]:
            donor = max(range(num_clients), key=lambda i: (len(buckets[i]), -i))
            take = int(rng.integers(len(buckets[donor])))
            buckets[client].append(buckets[donor].pop(take))
    return [np.sort(np.asarray(b, dtype=np.int64)) for b in buckets]


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
