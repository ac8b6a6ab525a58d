"""MultiKrum: average the ``m`` clients whose updates are closest to their neighbours.

Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017.

With ``n`` counted clients of which at most ``f`` are assumed Byzantine, client
``i``'s score is the sum of the squared distances from its model to its
``max(1, n - f - 2)`` nearest other models; the ``m`` lowest-scoring clients are
averaged with their example weights (``m = 1`` is Krum; by default ``m = n - f``, the
paper's Multi-Krum; Flower's default is ``m = 1``). Distances between models
equal distances between updates, so they are computed on the updates (in float64).
Selection and averaging follow Flower 1.42's ``flwr.serverapp.strategy.MultiKrum``.
Not linear: refused under secure aggregation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

from fedcore.serverside.strategies.base import Aggregate, ClientUpdate, Strategy, apply_update

__all__ = ["MultiKrum", "MultiKrumOptions", "krum_scores", "krum_select"]


@dataclass(frozen=True)
class MultiKrumOptions:
    """``[strategy.options]`` of ``multikrum``.

    Parameters
    ----------
    num_malicious_nodes : int (default: 0)
        ``f``, the number of Byzantine clients tolerated (``num-malicious-nodes``).
    num_nodes_to_select : int (default: 0)
        ``m``, how many lowest-scoring clients are averaged (``num-nodes-to-select``);
        0 is the paper's ``m = n - f`` for the ``n`` clients counted in the round (so
        the defaults average everyone: set ``num-malicious-nodes`` to tolerate
        Byzantine clients); all counted clients when fewer replied.

    """

    num_malicious_nodes: int = 0
    num_nodes_to_select: int = 0

    def __post_init__(self) -> None:
        """Range checks (``field: allowed`` becomes the ConfigError's text)."""
        if self.num_malicious_nodes < 0:
            raise ValueError("num_malicious_nodes: must be an integer >= 0")
        if self.num_nodes_to_select < 0:
            raise ValueError("num_nodes_to_select: must be an integer >= 1, or 0 for n - f")


def krum_scores(replies: Sequence[ClientUpdate], num_malicious: int) -> np.ndarray:
    """Each client's Krum score: summed squared distances to its ``n - f - 2`` nearest.

    >>> u = [ClientUpdate(i, 1, {"w": np.array([x])}, {}) for i, x in enumerate([0., 1., 3., 10.])]
    >>> krum_scores(u, 1).tolist()      # n - f - 2 = 1 nearest other
    [1.0, 1.0, 4.0, 49.0]
    """
    n = len(replies)
    gram = np.zeros((n, n))
    for name in replies[0].update:
        flat = np.stack([np.asarray(r.update[name], np.float64).ravel() for r in replies])
        gram += flat @ flat.T
    norms = np.diag(gram)
    dist = np.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
    np.fill_diagonal(dist, np.inf)  # a client is not its own neighbour
    closest = max(1, n - num_malicious - 2)
    return np.sort(dist, axis=1)[:, : min(closest, n - 1)].sum(axis=1) if n > 1 else np.zeros(1)


def krum_select(replies: Sequence[ClientUpdate], num_malicious: int, num_select: int) -> list[int]:
    """Indices of the ``num_select`` lowest Krum scores, best first (ties: earlier reply)."""
    scores = krum_scores(replies, num_malicious)
    return [int(i) for i in np.argsort(scores, kind="stable")[:num_select]]


class MultiKrum(Strategy):
    """Example-weighted mean of the ``num-nodes-to-select`` best-scoring updates."""

    name = "multikrum"
    linear = False
    Options = MultiKrumOptions

    def _num_select(self, num_clients: int) -> int:
        m = int(self.options.num_nodes_to_select)
        return m if m > 0 else max(1, num_clients - int(self.options.num_malicious_nodes))

    def server_update(
        self, server_round: int, arrays: ArrayRecord, aggregate: Aggregate
    ) -> ArrayRecord:
        """``x + sum_{i in selected} n_i update_i / sum_{i in selected} n_i``."""
        replies = aggregate.replies
        assert replies, "MultiKrum needs the individual updates"
        f = int(self.options.num_malicious_nodes)
        chosen = [replies[i] for i in krum_select(replies, f, self._num_select(len(replies)))]
        total = float(sum(r.num_examples for r in chosen))
        mean = {
            name: sum(r.num_examples * np.asarray(r.update[name], np.float64) for r in chosen)
            / total
            for name in chosen[0].update
        }
        return apply_update(arrays, mean)
