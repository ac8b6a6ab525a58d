"""Krum: the one client update closest to its neighbours becomes the next model.

Blanchard, El Mhamdi, Guerraoui and Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017.

MultiKrum with ``m = 1`` (see :mod:`fedcore.serverside.strategies.multikrum`), as in
Flower 1.42's ``flwr.serverapp.strategy.Krum``. Not linear: refused under secure
aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcore.serverside.strategies.multikrum import MultiKrum

__all__ = ["Krum", "KrumOptions"]


@dataclass(frozen=True)
class KrumOptions:
    """``[strategy.options]`` of ``krum``.

    Parameters
    ----------
    num_malicious_nodes : int (default: 0)
        ``f``, the number of Byzantine clients tolerated (``num-malicious-nodes``).

    """

    num_malicious_nodes: int = 0

    def __post_init__(self) -> None:
        """Range check (``field: allowed`` becomes the ConfigError's text)."""
        if self.num_malicious_nodes < 0:
            raise ValueError("num_malicious_nodes: must be an integer >= 0")


class Krum(MultiKrum):
    """The single best-scoring client's model."""

    name = "krum"
    Options = KrumOptions

    def _num_select(self, num_clients: int) -> int:
        return 1
