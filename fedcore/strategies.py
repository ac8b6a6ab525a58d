"""Public strategy API: ``from fedcore.strategies import FedAvg, Strategy``.

The strategies live in :mod:`fedcore.serverside.strategies`; this module re-exports
what a user's own strategy needs (see docs/strategies.md).
"""

from __future__ import annotations

# Every built-in strategy and the base API, by the package's own __all__: registering a
# new built-in strategy does not touch this file.
from fedcore.serverside.exchange import Aggregate as Aggregate
from fedcore.serverside.exchange import ClientUpdate as ClientUpdate
from fedcore.serverside.strategies import *  # noqa: F403
from fedcore.serverside.strategies import __all__ as _builtin
from fedcore.serverside.strategies.base import prefixed as prefixed
from fedcore.serverside.strategies.base import stacked_updates as stacked_updates
from fedcore.serverside.strategies.base import unprefixed as unprefixed

__all__ = sorted(
    {*_builtin, "Aggregate", "ClientUpdate", "prefixed", "stacked_updates", "unprefixed"}
)
