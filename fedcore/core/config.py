"""Typed, validated run configuration: one TOML file -> frozen dataclasses.

A config file has one table per section (``[run]``, ``[data]``, ``[model]``,
``[train]``, ``[strategy]``, ``[round]``, ``[engine]``, ``[deploy]``, ``[secagg]``);
keys are kebab-case. Each key is declared once, on its dataclass field, with
:func:`~fedcore.core.keys.key`: type, default, rule and one line of help. Every value
is checked before anything trains, and a bad one raises :class:`ConfigError` naming
the dotted key, the value found and what is allowed::

    >>> cfg = config_from_dict({"run": {"rounds": 3}, "data": {"alpha": 0.1}})
    >>> cfg.run.rounds, cfg.data.alpha
    (3, 0.1)
    >>> config_from_dict({"data": {"alpha": 0}})
    Traceback (most recent call last):
    ...
    fedcore.core.errors.ConfigError: config key 'data.alpha' has value 0.0: must be > 0 ...
    >>> try:
    ...     config_from_dict({"run": {"roundz": 3}})
    ... except ConfigError as exc:
    ...     print(exc)  # doctest: +ELLIPSIS
    config key 'run.roundz' has value 3: unknown key; did you mean 'run.rounds'? ...

Flower's run config is flat (``"data.alpha" = 0.1``); :func:`to_flat` and
:func:`config_from_flat` convert both ways, so the same config reaches the
ServerApp and ClientApp under every engine. Renamed keys keep working: their old
spelling (:data:`DEPRECATED_KEYS`) is read as the new key with a ``DeprecationWarning``.
The table of keys in ``simulations/README.md`` and pyproject's Flower mirror are
generated from these declarations (``python -m fedcore.storage.config_docs --write``).

One table is free-form: ``[app]``, whose keys reach every ClientApp verbatim as
top-level run-config keys (Flower's convention, for stock ClientApps)::

    >>> cfg = config_from_dict({"app": {"batch-size": 16}})
    >>> to_flat(cfg)["batch-size"], config_from_flat(to_flat(cfg)) == cfg
    (16, True)
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import tomli_w

from fedcore.core.errors import ConfigError
from fedcore.core.keys import (
    FrozenMap,
    KeyInfo,
    Rule,
    Scalar,
    Section,
    at_least,
    check_value_type,
    close_match,
    finite_positive,
    greater_than,
    identifier_or_import_path,
    import_path_or_empty,
    in_range,
    key,
    key_infos,
    non_empty,
    one_of,
    zero_or_at_least,
)

__all__ = [
    "DEPRECATED_KEYS",
    "RESUME_MAY_CHANGE",
    "SECTIONS",
    "Config",
    "DataConfig",
    "DeployConfig",
    "EngineConfig",
    "FrozenMap",
    "ModelConfig",
    "RoundConfig",
    "RunConfig",
    "SecAggConfig",
    "StrategyConfig",
    "TrainConfig",
    "app_keys_problem",
    "config_from_dict",
    "config_from_flat",
    "declared_keys",
    "to_dict",
    "to_flat",
    "to_flower_tables",
    "to_toml",
]

PARTITIONERS = ("iid", "dirichlet", "shards")
DATA_SOURCES = ("digits", "synthetic", "file")
OPTIMIZERS = ("sgd", "adam")
#: Old spelling -> new key. The old one is still read (with a ``DeprecationWarning``).
DEPRECATED_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "strategy.round-timeout": "round.timeout",
        "strategy.min-available-clients": "round.min-available-clients",
        "strategy.min-train-replies": "round.min-train-replies",
        "strategy.round-retries": "round.retries",
        "strategy.retry-backoff": "round.retry-backoff",
    }
)


@dataclass(frozen=True)
class RunConfig(Section):
    """``[run]``: what to run and where to write it."""

    section = "run"

    seed: int = key(
        0,
        help="run seed; every random choice derives from (seed, round, purpose)",
        rule=at_least(0),
    )
    rounds: int = key(20, help="federated rounds", rule=at_least(1), resume_may_change=True)
    clients: int = key(10, help="virtual clients (partitions)", rule=at_least(1))
    out_dir: str = key(
        "runs",
        help="parent of run directories when --out is not given",
        rule=non_empty("path"),
        resume_may_change=True,
    )
    centralized_baseline: bool = key(
        True,
        help="also train the same model centrally and print its accuracy",
        resume_may_change=True,
    )
    baseline_epochs: int = key(
        10, help="epochs of that centralized baseline", rule=at_least(1), resume_may_change=True
    )
    tensorboard: bool = key(
        True,
        help="write each round's metrics as TensorBoard event files in <run-dir>/tensorboard",
        resume_may_change=True,
    )
    mlflow: bool = key(
        False,
        help="log the config and each round's metrics to MLflow (pip install 'fedcore[mlflow]')",
        resume_may_change=True,
    )
    mlflow_tracking_uri: str = key(
        "",
        help="MLflow tracking URI for run.mlflow (empty: MLflow's default, MLFLOW_TRACKING_URI)",
        resume_may_change=True,
    )


@dataclass(frozen=True)
class DataConfig(Section):
    """``[data]``: the dataset, the held-out splits and how clients split the rest."""

    section = "data"

    source: str = key(
        "digits",
        help="where the examples come from (digits: scikit-learn's, offline; file: data.path)",
        choices=DATA_SOURCES,
    )
    path: str = key(
        "", help=".npz (arrays x, y) or .csv file for source = file; relative to the config file"
    )
    label_column: str = key("label", help="label column of a .csv file")
    test_fraction: float = key(
        0.2,
        help="held out for the server's centralized evaluation",
        rule=in_range(0, 1, open="both"),
    )
    val_fraction: float = key(
        0.1,
        help="of each client's data, kept for federated evaluation",
        rule=in_range(0, 1, open="high"),
    )
    partition: str = key(
        "dirichlet",
        help="how the clients split the training data (dirichlet: label skew, see alpha)",
        choices=PARTITIONERS,
    )
    alpha: float = key(
        0.5,
        help="Dirichlet concentration; smaller = more label skew, e.g. 0.5",
        rule=finite_positive,
    )
    shards_per_client: int = key(
        2, help="label-sorted shards per client, for partition = shards", rule=at_least(1)
    )
    synthetic_examples: int = key(
        2000, help="examples generated for source = synthetic", rule=at_least(4)
    )
    synthetic_features: int = key(20, help="features of each synthetic example", rule=at_least(2))
    synthetic_classes: int = key(10, help="classes of the synthetic data", rule=at_least(2))
    num_classes: int = key(
        0,
        help="0 = infer from the labels; set it when clients hold their own files",
        rule=at_least(0),
    )

    def cross_check(self) -> None:
        """``source = 'file'`` needs a ``path``."""
        if self.source == "file" and not self.path:
            raise ConfigError(
                "data.path",
                self.path,
                "data.source = 'file' needs data.path: a .npz (arrays 'x', 'y') or .csv file",
            )


@dataclass(frozen=True)
class ModelConfig(Section):
    """``[model]``: a factory returning any ``torch.nn.Module``, and optional loops.

    ``factory`` is a built-in name (``"cnn"``, ``"mlp"``) or an import path
    ``"package.module:function"``. ``kwargs`` (the ``[model.kwargs]`` table) are
    passed to it; ``input_shape`` and ``num_classes`` are filled in from the data
    when the factory accepts them and the table does not set them.
    """

    section = "model"

    factory: str = key(
        "cnn",
        help="cnn, mlp, or an import path 'package.module:function' returning a torch.nn.Module",
        rule=non_empty(),
    )
    kwargs: FrozenMap = key(
        FrozenMap(), help="keyword arguments for the factory (the [model.kwargs] table)"
    )
    train_fn: str = key(
        "",
        help="custom training loop by import path (empty: the built-in loop)",
        rule=import_path_or_empty(empty_means="built-in loop"),
    )
    evaluate_fn: str = key(
        "",
        help="custom evaluation loop by import path (empty: the built-in loop)",
        rule=import_path_or_empty(empty_means="built-in loop"),
    )


@dataclass(frozen=True)
class TrainConfig(Section):
    """``[train]``: each client's local training."""

    section = "train"

    local_epochs: int = key(2, help="local epochs per round", rule=at_least(1))
    batch_size: int = key(32, help="local mini-batch size", rule=at_least(1))
    lr: float = key(0.05, help="local learning rate", rule=finite_positive)
    momentum: float = key(0.9, help="SGD momentum", rule=in_range(0, 1, open="high"))
    weight_decay: float = key(0.0, help="L2 weight decay of the local optimizer", rule=at_least(0))
    optimizer: str = key("sgd", help="local optimizer", choices=OPTIMIZERS)
    # Bounds on what a server may ask of this client per round (the client's own config
    # decides; a value outside them is refused with a reason, never clamped).
    min_lr: float = key(
        1e-6, help="smallest learning rate a server may send this client", rule=finite_positive
    )
    max_lr: float = key(
        10.0, help="largest learning rate a server may send this client", rule=finite_positive
    )
    max_local_epochs: int = key(
        100, help="most local epochs a server may ask of this client", rule=at_least(1)
    )
    max_batch_size: int = key(
        65536, help="largest mini-batch a server may ask of this client", rule=at_least(1)
    )

    def cross_check(self) -> None:
        """The client's own values lie inside its bounds."""
        if self.min_lr > self.max_lr:
            raise ConfigError(
                "train.min-lr", self.min_lr, f"must be <= train.max-lr ({self.max_lr})"
            )
        for name, value, low, high in (
            ("lr", self.lr, self.min_lr, self.max_lr),
            ("local-epochs", self.local_epochs, 1, self.max_local_epochs),
            ("batch-size", self.batch_size, 1, self.max_batch_size),
        ):
            if not low <= value <= high:
                raise ConfigError(
                    f"train.{name}", value, f"must be in [{low:g}, {high:g}] (this client's bounds)"
                )


@dataclass(frozen=True)
class StrategyConfig(Section):
    """``[strategy]``: which strategy aggregates, its options, and client sampling.

    ``options`` (the ``[strategy.options]`` table) is free-form here: each strategy
    checks its own options. The round policy (deadline, retries, minimum clients)
    is in :class:`RoundConfig`.
    """

    section = "strategy"

    name: str = key(
        "fedavg",
        help="the strategy that turns the clients' replies into the next model",
        rule=identifier_or_import_path(what="Class", where="docs/strategies.md"),
    )
    options: FrozenMap = key(
        FrozenMap(),
        help="the strategy's own options (the [strategy.options] table; the strategy checks them)",
    )
    fraction_train: float = key(
        1.0, help="fraction of clients sampled for training each round", rule=in_range(0, 1)
    )
    min_train_clients: int = key(2, help="lower bound on the training sample", rule=at_least(0))
    fraction_evaluate: float = key(
        1.0, help="fraction of clients sampled for evaluation each round", rule=in_range(0, 1)
    )
    min_evaluate_clients: int = key(
        2, help="lower bound on the evaluation sample", rule=at_least(0)
    )
    max_num_examples: int = key(
        0, help="replies claiming more examples are rejected (0 = no cap)", rule=at_least(0)
    )
    max_reply_mb: float = key(
        0.0,
        help="larger replies are rejected unread (0 = twice the model's size + 1 MiB)",
        rule=at_least(0),
    )
    accumulation_block: int = key(
        32,
        help="clients summed in float32 before a float64 flush (fedcore/core/aggregation.py)",
        rule=at_least(1),
    )
    accumulation_threads: int = key(
        1,
        help="threads the server's weighted mean is split over (0 = one per core, at most "
        "4); results are bit-identical for any number (docs/benchmarks.md)",
        rule=at_least(0),
        resume_may_change=True,
    )


@dataclass(frozen=True)
class RoundConfig(Section):
    """``[round]``: the round policy, apart from the strategy: deadline, quorum, retries."""

    section = "round"

    timeout: float = key(
        600.0,
        help="seconds to wait for replies per stage (the round's deadline)",
        rule=greater_than(0, finite=False),
        resume_may_change=True,
    )
    min_available_clients: int = key(
        2, help="wait for this many connected clients before a round", rule=at_least(0)
    )
    min_train_replies: int = key(
        1, help="valid training replies needed for a round to count", rule=at_least(1)
    )
    retries: int = key(
        2,
        help="retries of a round that did not count (the previous model is kept)",
        rule=at_least(0),
        resume_may_change=True,
    )
    retry_backoff: float = key(
        1.0,
        help="seconds before the first retry, doubled after each",
        rule=at_least(0),
        resume_may_change=True,
    )


@dataclass(frozen=True)
class EngineConfig(Section):
    """``[engine]``: the embedded simulation engine."""

    section = "engine"

    workers: int = key(
        0,
        help="embedded-engine executors (0 = one per core; executor 0 is a thread of the server)",
        rule=at_least(0),
        resume_may_change=True,
    )


@dataclass(frozen=True)
class DeployConfig(Section):
    """``[deploy]``: the ServerApp under a deployment engine (``fedcore server``, ``flwr run``).

    ``run-dir`` is the exact run directory when the engine gives the ServerApp no
    ``run-dir`` node config (Flower's deployment engine never does); empty means
    ``<run.out-dir>/<timestamp>``. ``poll-interval`` is how often the ServerApp
    pulls for replies (Flower's own grid waits 3 s between pulls). ``pack-arrays``
    sends a message's arrays as one object instead of two per array
    (:mod:`fedcore.core.packing`; a ClientApp other than fedcore's must leave it off).
    """

    section = "deploy"

    run_dir: str = key(
        "",
        help="the run directory under fedcore server (set by --out; empty: under run.out-dir)",
        resume_may_change=True,
    )
    poll_interval: float = key(
        0.05,
        help="seconds between the ServerApp's pulls for replies in deployment",
        rule=in_range(0, 10, open="low"),
        resume_may_change=True,
    )
    resume: bool = key(
        False,
        help="continue the run in run-dir from its checkpoint (fedcore server --resume)",
        resume_may_change=True,
    )
    pack_arrays: bool = key(
        True,
        help="send each record of arrays as one packed object in deployment (fedcore's "
        "ClientApp unpacks it; fedcore server --client-app turns it off for other ClientApps)",
        resume_may_change=True,
    )


class _MetricNames(Rule):
    """Empty, or comma-separated metric names (no ``train_loss``: always carried)."""

    def ok(self, value: Any) -> bool:
        names = [n.strip() for n in str(value).split(",")] if value else []
        return (
            all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", n) for n in names)
            and len(set(names)) == len(names)
            and "train_loss" not in names
        )

    def allowed(self, kind: type) -> str:
        return (
            "must be empty or distinct metric names separated by commas, e.g. "
            "'train_acc,train_f1' (train_loss is always carried)"
        )


@dataclass(frozen=True)
class SecAggConfig(Section):
    """``[secagg]``: secure aggregation (SecAgg+); the server learns only the weighted sum.

    ``neighbours``/``threshold`` 0 pick ``k = O(log n)`` and ``t = k/2 + 1``
    (see ``fedcore.secagg.protocol.graph``). Updates (trained minus global model) are
    clipped to ``[-clip, clip]`` and quantized with ``bits`` bits in a ring
    of ``ring-bits`` bits (0: 64 in the first round, then 32 whenever the last
    round's total weight leaves room; the ring never changes the result); the
    error bound is in docs/security.md.
    ``stage-timeout`` is the deadline of each key exchange; the exchange that
    trains uses ``round.timeout``. ``evaluate`` also aggregates the
    federated evaluation securely (no per-client accuracy or validation count).
    """

    section = "secagg"

    enabled: bool = key(
        True, help="secure aggregation (SecAgg+) of the training updates; needs run.clients >= 3"
    )
    evaluate: bool = key(True, help="aggregate the federated evaluation securely too")
    neighbours: int = key(
        0, help="each client's neighbours k (0 = auto: O(log n))", rule=zero_or_at_least(2)
    )
    threshold: int = key(
        0,
        help="shares t that unmask a client (0 = auto: a majority of the neighbours)",
        rule=zero_or_at_least(2),
    )
    clip: float = key(
        4.0,
        help="updates (trained - global) are clipped to [-clip, clip] before quantization",
        rule=finite_positive,
    )
    bits: int = key(
        16,
        help="quantization bits (<= 24 with ring-bits = 32); error bound in docs/security.md",
        rule=in_range(2, 56),
    )
    ring_bits: int = key(
        0,
        help="ring size in bits (0 = auto: 64 in round 1, then 32 when safe)",
        rule=one_of(0, 32, 64),
    )
    stage_timeout: float = key(
        60.0, help="seconds: the deadline of each key-exchange stage", rule=finite_positive
    )
    min_neighbours: int = key(
        2,
        help="this client refuses a round with fewer neighbours k (its local minimum)",
        rule=at_least(2),
    )
    min_threshold: int = key(
        2,
        help="this client refuses a round whose threshold t is lower (its local minimum)",
        rule=at_least(2),
    )
    max_weight: int = key(
        1_000_000,
        help="this client's weight cap (examples), signed into its advert; the server "
        "checks the total against the counted clients' caps",
        rule=at_least(1),
    )
    extra_metrics: str = key(
        "",
        help="your train function's extra metrics the secure sum also averages, "
        "comma-separated (e.g. 'train_acc'); every client must return them",
        rule=_MetricNames(),
    )

    def cross_check(self) -> None:
        """``threshold <= neighbours``; ``bits`` fits the ring."""
        if self.neighbours != 0 and self.threshold > self.neighbours:
            raise ConfigError(
                "secagg.threshold",
                self.threshold,
                f"must be <= secagg.neighbours ({self.neighbours})",
            )
        if self.neighbours != 0 and self.threshold != 0 and 2 * self.threshold <= self.neighbours:
            raise ConfigError(
                "secagg.threshold",
                self.threshold,
                f"must be > secagg.neighbours / 2 ({self.neighbours} / 2): with t <= k/2 a "
                "server can split a client's neighbours in two and unmask it "
                "(or set 0 = auto, a majority)",
            )
        top = 24 if self.ring_bits == 32 else 56
        if not 2 <= self.bits <= top:
            raise ConfigError(
                "secagg.bits",
                self.bits,
                f"must be in [2, {top}] for ring-bits = {self.ring_bits} (the ring must also "
                "hold the total example count: N * 2^(bits-1) < 2^(ring-bits-1))",
            )


@dataclass(frozen=True)
class Config:
    """A whole, validated fedcore run configuration."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    #: ``[app]``: free-form scalars every ClientApp gets as top-level run-config keys
    #: (``[app] batch-size = 32`` -> ``context.run_config["batch-size"] == 32``).
    app: FrozenMap = field(default_factory=FrozenMap)

    def validate(self) -> None:
        """Validate every section, then the rules that span sections."""
        for name in SECTIONS:
            getattr(self, name).validate()
        problem = app_keys_problem(self.app)
        if problem is not None:
            raise ConfigError(*problem)
        clients = self.run.clients
        if self.round.min_available_clients > clients:
            raise ConfigError(
                "round.min-available-clients",
                self.round.min_available_clients,
                f"must be <= run.clients ({clients})",
            )
        if self.strategy.min_train_clients > clients:
            raise ConfigError(
                "strategy.min-train-clients",
                self.strategy.min_train_clients,
                f"must be <= run.clients ({clients})",
            )
        if self.secagg.enabled and clients < 3:
            raise ConfigError(
                "secagg.enabled",
                self.secagg.enabled,
                f"secure aggregation needs at least 3 clients per round, run.clients is "
                f"{clients}: use more clients or set [secagg] enabled = false",
            )

    def replace(self, **sections: Mapping[str, Any]) -> Config:
        """Return a validated copy with some keys of some sections changed.

        >>> Config().replace(run={"rounds": 2}).run.rounds
        2
        """
        raw = to_dict(self)
        for name, values in _resolve_aliases(sections).items():
            raw.setdefault(name, {}).update(values)
        return config_from_dict(raw)


#: Section name -> its dataclass, in file order (the free-form ``[app]`` table is no section).
SECTIONS: Mapping[str, type[Section]] = MappingProxyType(
    {f.name: f.default_factory for f in fields(Config) if f.name != "app"}  # type: ignore[misc]
)
#: What ``[app]`` is for, in error messages.
_APP_HELP = (
    "[app] keys reach every ClientApp verbatim as top-level run-config keys "
    "(Flower's convention: [app] batch-size = 32 gives context.run_config['batch-size'])"
)


def app_keys_problem(app: Mapping[str, Any]) -> tuple[str, Any, str] | None:
    """``(key, value, what is allowed)`` for the first bad ``[app]`` entry, else ``None``.

    Values are TOML scalars (Flower's run config holds only those); a key must not
    collide with fedcore's flat keys (``run.rounds``) or a section name (``run``).
    """
    for k, v in app.items():
        if not isinstance(v, bool | int | float | str):
            return f"app.{k}", v, f"must be a boolean, number or string; {_APP_HELP}"
        head = str(k).split(".", 1)[0]
        if head in SECTIONS:
            clash = f"fedcore's [{head}] section" if head == k else f"fedcore's key '{k}'"
            return (
                f"app.{k}",
                v,
                f"collides with {clash} in Flower's flat run config; {_APP_HELP}, so they "
                f"must not start with a fedcore section name ({', '.join(SECTIONS)}): "
                "rename the key in your ClientApp and here",
            )
    return None


def declared_keys() -> list[KeyInfo]:
    """Every declared key of every section, in file order (docs are built from this)."""
    return [info for cls in SECTIONS.values() for info in key_infos(cls)]


#: Keys that do not change which model a run produces; they may differ on ``--resume``.
RESUME_MAY_CHANGE: frozenset[str] = frozenset(
    info.dotted for info in declared_keys() if info.resume_may_change
)


def _caller_stacklevel() -> int:
    """``stacklevel`` that points a warning at the first frame outside this module."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def _resolve_aliases(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with each deprecated key moved onto its new key (one warning each)."""
    out = dict(raw)
    for old, new in DEPRECATED_KEYS.items():
        old_section, old_key = old.split(".", 1)
        new_section, new_key = new.split(".", 1)
        table = out.get(old_section)
        if not isinstance(table, Mapping) or old_key not in table:
            continue
        value = table[old_key]
        target = out.get(new_section, {})
        if not isinstance(target, Mapping):
            raise ConfigError(new_section, target, f"must be a table [{new_section}]")
        if new_key in target:
            raise ConfigError(
                old,
                value,
                f"is the old spelling of '{new}', which is also given ({target[new_key]!r}); "
                f"keep only '{new}'",
            )
        warnings.warn(
            f"config key '{old}' is deprecated; use '{new}'",
            DeprecationWarning,
            stacklevel=_caller_stacklevel(),
        )
        out[old_section] = {k: v for k, v in table.items() if k != old_key}
        out[new_section] = {**target, new_key: value}
    return out


def _unknown_key_hint(section: str, name: str) -> str:
    """``"did you mean 'run.rounds'? "`` for a near miss, else ``""``."""
    here = {info.name: info.dotted for info in key_infos(SECTIONS[section])}
    here.update(
        {
            old.split(".", 1)[1]: new
            for old, new in DEPRECATED_KEYS.items()
            if old.startswith(section + ".")
        }
    )
    near = close_match(name, list(here))
    if near is not None:
        return f"did you mean '{here[near]}'? "
    elsewhere = [info.dotted for info in declared_keys() if info.name == name]
    return f"did you mean '{elsewhere[0]}'? " if elsewhere else ""


def _build_section(name: str, cls: type[Section], raw: object) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(name, raw, f"must be a table [{name}]")
    infos = {info.name: info for info in key_infos(cls)}
    values: dict[str, Any] = {}
    for k, value in raw.items():
        info = infos.get(k)
        if info is None:
            raise ConfigError(
                f"{name}.{k}",
                value,
                f"unknown key; {_unknown_key_hint(name, k)}"
                f"[{name}] accepts {', '.join(sorted(infos))}",
            )
        values[info.attr] = check_value_type(info, value)
    return cls(**values)


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (parsed TOML)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("<root>", raw, "a config must be a table of sections")
    raw = dict(raw)
    app = raw.pop("app", {})
    if not isinstance(app, Mapping):
        raise ConfigError("app", app, f"must be a table [app]; {_APP_HELP}")
    for name, value in raw.items():
        if name not in SECTIONS:
            near = close_match(str(name), list(SECTIONS))
            hint = f"did you mean '{near}'? " if near else ""
            raise ConfigError(
                name, value, f"unknown section; {hint}allowed sections: {', '.join(SECTIONS)}"
            )
    sections = {
        name: _build_section(name, SECTIONS[name], value)
        for name, value in _resolve_aliases(raw).items()
    }
    problem = app_keys_problem(app)
    if problem is not None:
        raise ConfigError(*problem)
    cfg = Config(**sections, app=FrozenMap(app))
    cfg.validate()
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Nested plain-dict form with kebab-case keys (what a TOML file holds)."""
    out: dict[str, dict[str, Any]] = {}
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        out[name] = {
            info.name: dict(v) if info.is_table else v
            for info in key_infos(cls)
            for v in (getattr(section, info.attr),)
        }
    if cfg.app:
        out["app"] = dict(cfg.app)
    return out


def to_flat(cfg: Config) -> dict[str, Scalar]:
    """Flat ``{"section.key": value}`` form: Flower's run config (``[app]`` keys as they are)."""
    flat: dict[str, Scalar] = dict(cfg.app)
    for section, table in to_dict(cfg).items():
        if section == "app":
            continue
        for k, value in table.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    flat[f"{section}.{k}.{sub}"] = v
            else:
                flat[f"{section}.{k}"] = value
    return flat


def to_flower_tables(cfg: Config) -> dict[str, Any]:
    """The nested tables of Flower's ``[tool.flwr.app.config]`` (a FAB's, pyproject's).

    Sections are tables, ``[app]`` keys sit at the top (empty tables are left out);
    Flower's ``flatten_dict`` of the result is :func:`to_flat` of ``cfg``.
    """
    tables: dict[str, Any] = {
        section: {k: v for k, v in table.items() if v != {}}
        for section, table in to_dict(cfg).items()
        if section != "app"
    }
    return {**dict(cfg.app), **tables}


def config_from_flat(flat: Mapping[str, Any]) -> Config:
    """Inverse of :func:`to_flat` (Flower hands apps this flat form).

    A key outside fedcore's sections (``batch-size``, ``num-server-rounds``) is an
    ``[app]`` key; one inside a section is checked like any other (``train.lrr`` is refused).
    """
    nested: dict[str, Any] = {}
    app: dict[str, Any] = {}
    for dotted, value in flat.items():
        if dotted.split(".", 1)[0] not in SECTIONS:
            app[dotted] = value
            continue
        parts = dotted.split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(dotted, value, f"conflicts with scalar key '{part}'")
            node = child
        node[parts[-1]] = value
    return config_from_dict({**nested, **({"app": app} if app else {})})


def to_toml(cfg: Config) -> str:
    """Render a config as TOML text that ``load_config`` (fedcore.storage) reads back as is."""
    return tomli_w.dumps(to_dict(cfg))
