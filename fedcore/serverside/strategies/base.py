"""The strategy contract: choose who trains with what, then turn one aggregate into the next model.

A round, as the round loop (:func:`fedcore.serverside.rounds.run_federation`) runs it::

    strategy.configure_train(round, global, config, nodes)  -> per-client messages
    exchange.train(grid, messages, ...)                      -> Aggregate  (plain | secure)
    strategy.server_update(round, global, aggregate)         -> next global

A strategy never sees the grid and never knows which exchange ran: the
:class:`~fedcore.serverside.exchange.Aggregate` holds the example-weighted mean of the
clients' updates (``trained - global``), the total weight, the weighted metrics and
the rejections, whether the plain exchange or secure aggregation produced it. A
*linear* strategy (the default) needs nothing else, so it works unchanged under
secure aggregation. A strategy that needs each client's update (median, Krum) sets
``linear = False``; the plain exchange then also hands it the individual updates,
and secure aggregation refuses it before the run starts.

Writing one: subclass :class:`Strategy` (or :class:`~fedcore.serverside.strategies.FedAvg`),
give it a ``name``, an ``Options`` dataclass for ``[strategy.options]`` and a
``server_update``; see docs/strategies.md.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedcore.core.aggregation import ArraySpec, array_view, numpy_to_array
from fedcore.core.errors import ConfigError
from fedcore.core.records import ARRAYS, CONFIG, Rejection
from fedcore.core.sampling import sample_clients
from fedcore.serverside.exchange import Aggregate, ClientUpdate, EvaluateResult

__all__ = [
    "Aggregate",
    "ClientUpdate",
    "EvaluateResult",
    "NoOptions",
    "Rejection",
    "Sampling",
    "Strategy",
    "apply_update",
    "arrays_to_numpy",
    "options_from_mapping",
    "prefixed",
    "stacked_updates",
    "unprefixed",
]


@dataclass(frozen=True)
class Sampling:
    """Who takes part in a round: a fraction of the connected nodes, at least a minimum.

    Seeded by ``(run seed, round, purpose)`` (:func:`fedcore.core.sampling.sample_clients`),
    so a resumed run samples exactly what an uninterrupted one would.
    """

    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 2
    min_evaluate_clients: int = 2


@dataclass(frozen=True)
class NoOptions:
    """A strategy without options: ``[strategy.options]`` must be empty."""


def options_from_mapping(cls: type[Any], raw: Mapping[str, Any], *, prefix: str) -> Any:
    """Build the options dataclass ``cls`` from ``raw`` (``[strategy.options]``), checked.

    Keys are kebab-case (``server-lr`` fills field ``server_lr``). An unknown key, a
    value of the wrong type, or a value the dataclass's ``__post_init__`` rejects
    (raise ``ValueError`` with what is allowed) becomes a :class:`ConfigError`
    naming ``<prefix>.<key>``.

    >>> @dataclass(frozen=True)
    ... class Opts:
    ...     server_lr: float = 1.0
    >>> options_from_mapping(Opts, {"server-lr": 0.5}, prefix="strategy.options")
    Opts(server_lr=0.5)
    """
    by_key = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        f = by_key.get(key)
        if f is None:
            import difflib

            allowed = ", ".join(sorted(by_key)) or "no options"
            close = difflib.get_close_matches(key, list(by_key), n=1)
            hint = f"; did you mean '{prefix}.{close[0]}'?" if close else ""
            raise ConfigError(f"{prefix}.{key}", value, f"unknown option; allowed: {allowed}{hint}")
        values[f.name] = _typed(f"{prefix}.{key}", value, f.type, f.default)
    try:
        return cls(**values)
    except ValueError as exc:
        key, _, allowed = str(exc).partition(": ")
        if allowed and key.replace("_", "-") in by_key:
            name = key.replace("_", "-")
            raise ConfigError(f"{prefix}.{name}", raw.get(name), allowed) from None
        raise ConfigError(prefix, dict(raw), str(exc)) from None


def _typed(key: str, value: Any, annotation: Any, default: Any) -> Any:
    kind = annotation if isinstance(annotation, type) else type(default)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, "must be a number")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if kind is str and not isinstance(value, str):
        raise ConfigError(key, value, "must be a string")
    return value


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Read-only numpy views of a record's arrays, by name (no copies)."""
    return {name: array_view(arr) for name, arr in arrays.items()}


def apply_update(
    arrays: ArrayRecord, update: Mapping[str, np.ndarray], *, scale: float = 1.0
) -> ArrayRecord:
    """``global + scale * update``, computed in float64, each array back in its own dtype.

    Integer arrays (e.g. BatchNorm's ``num_batches_tracked``) are rounded half to even.

    >>> from flwr.app import Array
    >>> g = ArrayRecord({"w": Array(np.array([1.0, 2.0], dtype=np.float32))})
    >>> apply_update(g, {"w": np.array([0.5, -1.0])})["w"].numpy().tolist()
    [1.5, 1.0]
    """
    out = {}
    for name, arr in arrays.items():
        g = array_view(arr)
        step = np.asarray(update[name], dtype=np.float64).reshape(g.shape)
        new = g.astype(np.float64) + (step if scale == 1.0 else scale * step)
        if g.dtype.kind in "biu":
            new = np.rint(new)
        out[name] = numpy_to_array(new.astype(g.dtype, copy=False))
    return ArrayRecord(out)


def stacked_updates(replies: Sequence[ClientUpdate]) -> dict[str, np.ndarray]:
    """The clients' individual updates stacked per array: ``name -> (clients, *shape)``.

    For non-linear strategies (``aggregate.replies``); float64, in reply order.

    >>> u = [ClientUpdate(1, 5, {"w": np.array([1.0, 2.0])}, {}),
    ...      ClientUpdate(2, 5, {"w": np.array([3.0, 4.0])}, {})]
    >>> stacked_updates(u)["w"].tolist()
    [[1.0, 2.0], [3.0, 4.0]]
    """
    if not replies:
        raise ValueError("no individual updates: is the strategy's `linear` set to False?")
    return {
        name: np.stack([np.asarray(r.update[name], dtype=np.float64) for r in replies])
        for name in replies[0].update
    }


def prefixed(prefix: str, arrays: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """``arrays`` with every name prefixed by ``prefix`` (for :meth:`Strategy.state_arrays`)."""
    return {f"{prefix}{name}": arr for name, arr in (arrays or {}).items()}


def unprefixed(prefix: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """The arrays whose names start with ``prefix``, prefix removed (float64 copies); or None."""
    out = {
        name[len(prefix) :]: np.array(arr, dtype=np.float64)
        for name, arr in arrays.items()
        if name.startswith(prefix)
    }
    return out or None


@dataclass
class _Registered:
    classes: dict[str, type[Strategy]] = field(default_factory=dict)


class Strategy(ABC):
    """Base class of server strategies.

    Parameters
    ----------
    options : Options instance, optional
        The strategy's own options (``[strategy.options]``); default: ``Options()``.
    seed : int (default: 0)
        Run seed; sampling in round ``r`` is seeded by ``(seed, r, purpose)``.
    sampling : Sampling, optional
        Who takes part in each round (default: everyone, at least 2).

    Class attributes a subclass sets: ``name`` (its ``[strategy] name``), ``linear``
    (``False`` when ``server_update`` needs the individual updates), ``Options`` (a
    frozen dataclass of its options).

    """

    #: The ``[strategy] name`` of this strategy.
    name: ClassVar[str] = ""
    #: ``True`` when the next model depends on the replies only through their weighted
    #: mean (works under secure aggregation); ``False`` when ``server_update`` needs
    #: ``aggregate.replies``, the individual updates (refused under secure aggregation).
    linear: ClassVar[bool] = True
    #: Frozen dataclass of the strategy's options (``[strategy.options]``).
    Options: ClassVar[type[Any]] = NoOptions

    def __init__(
        self, options: Any = None, *, seed: int = 0, sampling: Sampling | None = None
    ) -> None:
        self.options = options if options is not None else self.Options()
        self.seed = seed
        self.sampling = sampling if sampling is not None else Sampling()

    @classmethod
    def from_config(
        cls, options: Mapping[str, Any], *, seed: int = 0, sampling: Sampling | None = None
    ) -> Strategy:
        """Build from the raw ``[strategy.options]`` table (errors name the bad key)."""
        opts = options_from_mapping(cls.Options, options, prefix="strategy.options")
        return cls(opts, seed=seed, sampling=sampling)

    # -- what clients get ---------------------------------------------------------
    def train_config(self, server_round: int) -> dict[str, Any]:
        """Extra entries of every training message's ``"config"`` record (e.g. ``proximal-mu``)."""
        return {}

    def train_records(self, server_round: int, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """Extra ArrayRecords sent to every client beside the model (e.g. control variates)."""
        return {}

    def summed_records(self, arrays: ArrayRecord) -> dict[str, dict[str, ArraySpec]]:
        """ArrayRecords each client returns beside its model, averaged like the update.

        Name -> the arrays' specs. The exchange averages each with the clients' example
        weights (securely under secure aggregation) into ``aggregate.extras[name]``.
        """
        return {}

    def configure_train(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: Sequence[int],
    ) -> list[Message]:
        """Messages asking the sampled nodes to train: the model, the config, any extras."""
        nodes = self._sample(node_ids, server_round, "train")
        cfg = ConfigRecord({**dict(config), **self.train_config(server_round)})
        extra = self.train_records(server_round, arrays) if nodes else {}
        return _messages(arrays, cfg, server_round, nodes, MessageType.TRAIN, extra)

    def configure_evaluate(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        node_ids: Sequence[int],
    ) -> list[Message]:
        """Messages asking the sampled nodes to evaluate ``arrays``."""
        nodes = self._sample(node_ids, server_round, "evaluate")
        return _messages(arrays, config, server_round, nodes, MessageType.EVALUATE, {})

    def _sample(self, node_ids: Sequence[int], server_round: int, purpose: str) -> list[int]:
        s = self.sampling
        fraction = s.fraction_train if purpose == "train" else s.fraction_evaluate
        minimum = s.min_train_clients if purpose == "train" else s.min_evaluate_clients
        if fraction == 0.0:
            return []
        return sample_clients(
            node_ids,
            fraction=fraction,
            minimum=minimum,
            seed=self.seed,
            server_round=server_round,
            purpose=purpose,
        )

    # -- the next model -----------------------------------------------------------
    @abstractmethod
    def server_update(
        self, server_round: int, arrays: ArrayRecord, aggregate: Aggregate
    ) -> ArrayRecord:
        """The next global model from the current one and the round's aggregate.

        Called only when the round counted (``aggregate.update`` is not ``None``).
        """

    # -- state across a checkpoint ------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able strategy state for checkpoints (none by default)."""
        return {}

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Array-valued strategy state (server-optimizer moments, control variates)."""
        return {}

    def load_state(self, state: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` and :meth:`state_arrays` output."""
        if state or arrays:
            raise ValueError(
                f"{type(self).__name__} has no state, got keys {sorted(state)} / {sorted(arrays)}"
            )


def _messages(
    arrays: ArrayRecord,
    config: ConfigRecord,
    server_round: int,
    nodes: Sequence[int],
    message_type: str,
    extra: Mapping[str, ArrayRecord],
) -> list[Message]:
    cfg = ConfigRecord(dict(config))
    cfg["server-round"] = server_round
    content = RecordDict({ARRAYS: arrays, CONFIG: cfg, **extra})
    return [
        Message(
            content=content, dst_node_id=node, message_type=message_type, group_id=str(server_round)
        )
        for node in nodes
    ]
