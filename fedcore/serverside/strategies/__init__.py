"""Server strategies: one per module, registered by name in :data:`STRATEGIES`.

``[strategy] name`` is a registered name or an import path ``package.module:Class``
naming a subclass of :class:`Strategy` (usually of :class:`FedAvg`). Adding a
built-in strategy is one module (its class, its ``Options`` dataclass) plus its
registration here: the import, the entry in the tuple below and in ``__all__``
(:mod:`fedcore.strategies` re-exports that ``__all__``). Nothing else names a strategy:
:func:`strategy_class` resolves ``[strategy] name``, each strategy validates its own
``[strategy.options]``, and the round loop and both exchanges see only the
:class:`Strategy` hooks.
"""

from __future__ import annotations

from fedcore.core.errors import ConfigError
from fedcore.core.registry import Registry, import_object
from fedcore.serverside.strategies.base import (
    EvaluateResult,
    NoOptions,
    Rejection,
    Sampling,
    Strategy,
    apply_update,
    arrays_to_numpy,
    options_from_mapping,
)
from fedcore.serverside.strategies.fedadagrad import FedAdagrad
from fedcore.serverside.strategies.fedadam import FedAdam
from fedcore.serverside.strategies.fedavg import FedAvg
from fedcore.serverside.strategies.fedavgm import FedAvgM
from fedcore.serverside.strategies.fedmedian import FedMedian
from fedcore.serverside.strategies.fedopt import FedOpt
from fedcore.serverside.strategies.fedprox import FedProx
from fedcore.serverside.strategies.fedtrimmedavg import FedTrimmedAvg
from fedcore.serverside.strategies.fedyogi import FedYogi
from fedcore.serverside.strategies.krum import Krum
from fedcore.serverside.strategies.multikrum import MultiKrum
from fedcore.serverside.strategies.scaffold import Scaffold

__all__ = [
    "STRATEGIES",
    "EvaluateResult",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Krum",
    "MultiKrum",
    "NoOptions",
    "Rejection",
    "Sampling",
    "Scaffold",
    "Strategy",
    "apply_update",
    "arrays_to_numpy",
    "options_from_mapping",
    "strategy_class",
]

#: Built-in strategies by ``[strategy] name``.
STRATEGIES: Registry[type[Strategy]] = Registry("strategy")
for _cls in (
    FedAvg,
    FedAvgM,
    FedProx,
    FedAdagrad,
    FedAdam,
    FedYogi,
    Scaffold,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
):
    STRATEGIES.register(_cls.name, _cls)


def strategy_class(name: str) -> type[Strategy]:
    """The class ``[strategy] name`` names: a built-in, or ``package.module:Class``."""
    if name in STRATEGIES:
        return STRATEGIES.get(name)
    if ":" not in name:
        import difflib

        close = difflib.get_close_matches(name, list(STRATEGIES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            "strategy.name",
            name,
            f"must be one of {', '.join(STRATEGIES)} or an import path "
            f"'package.module:Class'{hint}",
        )
    cls = import_object(name, key="strategy.name")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(
            "strategy.name",
            name,
            "must name a subclass of fedcore.strategies.Strategy (e.g. of FedAvg)",
        )
    return cls
