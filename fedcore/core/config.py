"""Typed, validated run configuration: one TOML file -> frozen dataclasses.

A config file has one table per section (``[run]``, ``[data]``, ``[model]``,
``[train]``, ``[strategy]``, ``[engine]``, ``[deploy]``, ``[secagg]``); keys are kebab-case.
Every value is
checked before anything trains, and a bad one raises :class:`ConfigError` naming
the dotted key, the value found and what is allowed::

    >>> cfg = config_from_dict({"run": {"rounds": 3}, "data": {"alpha": 0.1}})
    >>> cfg.run.rounds, cfg.data.alpha
    (3, 0.1)
    >>> config_from_dict({"data": {"alpha": 0}})
    Traceback (most recent call last):
    ...
    fedcore.core.errors.ConfigError: config key 'data.alpha' has value 0.0: must be > 0 ...

Flower's run config is flat (``"data.alpha" = 0.1``); :func:`to_flat` and
:func:`config_from_flat` convert both ways, so the same config reaches the
ServerApp and ClientApp under every engine.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from fedcore.core.errors import ConfigError

__all__ = [
    "Config",
    "DataConfig",
    "DeployConfig",
    "EngineConfig",
    "ModelConfig",
    "RunConfig",
    "SecAggConfig",
    "StrategyConfig",
    "TrainConfig",
    "config_from_dict",
    "config_from_flat",
    "load_config",
    "to_dict",
    "to_flat",
    "to_toml",
]

Scalar = bool | int | float | str

PARTITIONERS = ("iid", "dirichlet", "shards")
DATA_SOURCES = ("digits", "synthetic", "file")
OPTIMIZERS = ("sgd", "adam")
STRATEGIES = ("fedavg",)


class FrozenMap(Mapping[str, Scalar]):
    """An immutable, hashable mapping (so a whole :class:`Config` can key a cache)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Scalar] | None = None) -> None:
        self._items = dict(items or {})

    def __getitem__(self, key: str) -> Scalar:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._items.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


@dataclass(frozen=True)
class RunConfig:
    """``[run]``: what to run and where to write it."""

    seed: int = 0
    rounds: int = 20
    clients: int = 10
    out_dir: str = "runs"
    centralized_baseline: bool = True
    baseline_epochs: int = 10

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first bad value."""
        _require(
            self.baseline_epochs >= 1,
            "run.baseline-epochs",
            self.baseline_epochs,
            "must be an integer >= 1",
        )
        _require(self.rounds >= 1, "run.rounds", self.rounds, "must be an integer >= 1")
        _require(self.clients >= 1, "run.clients", self.clients, "must be an integer >= 1")
        _require(self.seed >= 0, "run.seed", self.seed, "must be an integer >= 0")
        _require(bool(self.out_dir), "run.out-dir", self.out_dir, "must be a non-empty path")


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: the dataset, the held-out splits and how clients split the rest."""

    source: str = "digits"
    path: str = ""
    label_column: str = "label"
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    partition: str = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    synthetic_examples: int = 2000
    synthetic_features: int = 20
    synthetic_classes: int = 10
    num_classes: int = 0  # 0 = infer from the data; set it when clients hold files

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first bad value."""
        _require(
            self.source in DATA_SOURCES,
            "data.source",
            self.source,
            f"must be one of {', '.join(DATA_SOURCES)}",
        )
        if self.source == "file":
            _require(
                bool(self.path),
                "data.path",
                self.path,
                "data.source = 'file' needs data.path: a .npz (arrays 'x', 'y') or .csv file",
            )
        _require(
            self.partition in PARTITIONERS,
            "data.partition",
            self.partition,
            f"must be one of {', '.join(PARTITIONERS)}",
        )
        _require(
            math.isfinite(self.alpha) and self.alpha > 0,
            "data.alpha",
            self.alpha,
            "must be > 0 (Dirichlet concentration; smaller = more label skew, e.g. 0.5)",
        )
        _require(
            0.0 < self.test_fraction < 1.0,
            "data.test-fraction",
            self.test_fraction,
            "must be strictly between 0 and 1",
        )
        _require(
            0.0 <= self.val_fraction < 1.0,
            "data.val-fraction",
            self.val_fraction,
            "must be >= 0 and < 1",
        )
        _require(
            self.shards_per_client >= 1,
            "data.shards-per-client",
            self.shards_per_client,
            "must be an integer >= 1",
        )
        _require(
            self.num_classes >= 0,
            "data.num-classes",
            self.num_classes,
            "must be >= 0 (0 = infer from the labels)",
        )
        for key in ("synthetic_examples", "synthetic_features", "synthetic_classes"):
            value = getattr(self, key)
            minimum = 2 if key != "synthetic_examples" else 4
            _require(
                value >= minimum,
                "data." + key.replace("_", "-"),
                value,
                f"must be an integer >= {minimum}",
            )


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: a factory returning any ``torch.nn.Module``, and optional loops.

    ``factory`` is a built-in name (``"cnn"``, ``"mlp"``) or an import path
    ``"package.module:function"``. ``kwargs`` (the ``[model.kwargs]`` table) are
    passed to it; ``input_shape`` and ``num_classes`` are filled in from the data
    when the factory accepts them and the table does not set them.
    """

    factory: str = "cnn"
    kwargs: FrozenMap = field(default_factory=FrozenMap)
    train_fn: str = ""
    evaluate_fn: str = ""

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first bad value."""
        _require(
            bool(self.factory),
            "model.factory",
            self.factory,
            "must be 'cnn', 'mlp' or an import path 'package.module:function'",
        )
        for key in ("train_fn", "evaluate_fn"):
            value = getattr(self, key)
            _require(
                value == "" or ":" in value,
                "model." + key.replace("_", "-"),
                value,
                "must be empty (built-in loop) or an import path 'package.module:function'",
            )


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: each client's local training."""

    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first bad value."""
        _require(self.local_epochs >= 1, "train.local-epochs", self.local_epochs, "must be >= 1")
        _require(self.batch_size >= 1, "train.batch-size", self.batch_size, "must be >= 1")
        _require(math.isfinite(self.lr) and self.lr > 0, "train.lr", self.lr, "must be > 0")
        _require(0.0 <= self.momentum < 1.0, "train.momentum", self.momentum, "must be in [0, 1)")
        _require(self.weight_decay >= 0, "train.weight-decay", self.weight_decay, "must be >= 0")
        _require(
            self.optimizer in OPTIMIZERS,
            "train.optimizer",
            self.optimizer,
            f"must be one of {', '.join(OPTIMIZERS)}",
        )


@dataclass(frozen=True)
class StrategyConfig:
    """``[strategy]``: aggregation, client sampling and the per-round deadline."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    min_train_clients: int = 2
    fraction_evaluate: float = 1.0
    min_evaluate_clients: int = 2
    min_available_clients: int = 2
    round_timeout: float = 600.0
    min_train_replies: int = 1
    round_retries: int = 2
    retry_backoff: float = 1.0
    max_num_examples: int = 0  # 0 = no cap
    max_reply_mb: float = 0.0  # 0 = auto: 2 x the model's size + 1 MB
    accumulation_block: int = 32

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first bad value."""
        _require(
            self.name in STRATEGIES,
            "strategy.name",
            self.name,
            f"must be one of {', '.join(STRATEGIES)}",
        )
        for key in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, key)
            _require(
                0.0 <= value <= 1.0, "strategy." + key.replace("_", "-"), value, "must be in [0, 1]"
            )
        for key in ("min_train_clients", "min_evaluate_clients", "min_available_clients"):
            value = getattr(self, key)
            _require(value >= 0, "strategy." + key.replace("_", "-"), value, "must be >= 0")
        _require(
            self.round_timeout > 0,
            "strategy.round-timeout",
            self.round_timeout,
            "must be > 0 seconds",
        )
        _require(
            self.min_train_replies >= 1,
            "strategy.min-train-replies",
            self.min_train_replies,
            "must be an integer >= 1 (valid training replies needed to accept a round)",
        )
        _require(
            self.round_retries >= 0, "strategy.round-retries", self.round_retries, "must be >= 0"
        )
        _require(
            math.isfinite(self.retry_backoff) and self.retry_backoff >= 0,
            "strategy.retry-backoff",
            self.retry_backoff,
            "must be >= 0 seconds (doubled after each retry)",
        )
        _require(
            self.max_num_examples >= 0,
            "strategy.max-num-examples",
            self.max_num_examples,
            "must be >= 0 (0 = no cap)",
        )
        _require(
            math.isfinite(self.max_reply_mb) and self.max_reply_mb >= 0,
            "strategy.max-reply-mb",
            self.max_reply_mb,
            "must be >= 0 (0 = twice the model's size plus 1 MB)",
        )
        _require(
            self.accumulation_block >= 1,
            "strategy.accumulation-block",
            self.accumulation_block,
            "must be an integer >= 1 (clients summed in float32 before a float64 flush)",
        )


@dataclass(frozen=True)
class EngineConfig:
    """``[engine]``: the embedded simulation engine."""

    workers: int = 0  # 0 = one per CPU core

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first bad value."""
        _require(
            self.workers >= 0, "engine.workers", self.workers, "must be >= 0 (0 = one per core)"
        )


@dataclass(frozen=True)
class DeployConfig:
    """``[deploy]``: the ServerApp under a deployment engine (``fedcore server``, ``flwr run``).

    ``run-dir`` is the exact run directory when the engine gives the ServerApp no
    ``run-dir`` node config (Flower's deployment engine never does); empty means
    ``<run.out-dir>/<timestamp>``. ``poll-interval`` is how often the ServerApp
    pulls for replies (Flower's own grid waits 3 s between pulls).
    """

    run_dir: str = ""
    poll_interval: float = 0.05
    resume: bool = False  # continue the run in run-dir from its checkpoint

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first bad value."""
        _require(
            math.isfinite(self.poll_interval) and 0 < self.poll_interval <= 10,
            "deploy.poll-interval",
            self.poll_interval,
            "must be > 0 and <= 10 seconds (e.g. 0.05)",
        )


@dataclass(frozen=True)
class SecAggConfig:
    """``[secagg]``: secure aggregation (SecAgg+); the server learns only the weighted sum.

    ``neighbours``/``threshold`` 0 pick ``k = O(log n)`` and ``t = k/2 + 1``
    (see ``fedcore.secagg.protocol.graph``). Updates (trained minus global model) are
    clipped to ``[-clip, clip]`` and quantized with ``bits`` bits in a ring
    of ``ring-bits`` bits (0: 64 in the first round, then 32 whenever the last
    round's total weight leaves room; the ring never changes the result); the
    error bound is in docs/security.md.
    ``stage-timeout`` is the deadline of each key exchange; the exchange that
    trains uses ``strategy.round-timeout``. ``evaluate`` also aggregates the
    federated evaluation securely (no per-client accuracy or validation count).
    """

    enabled: bool = True
    evaluate: bool = True
    neighbours: int = 0
    threshold: int = 0
    clip: float = 4.0
    bits: int = 16
    ring_bits: int = 0
    stage_timeout: float = 60.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first bad value."""
        _require(
            self.neighbours >= 0 and self.neighbours != 1,
            "secagg.neighbours",
            self.neighbours,
            "must be 0 (auto: O(log n)) or an integer >= 2",
        )
        _require(
            self.threshold >= 0 and self.threshold != 1,
            "secagg.threshold",
            self.threshold,
            "must be 0 (auto: a majority of the neighbours) or an integer >= 2",
        )
        _require(
            self.neighbours == 0 or self.threshold <= self.neighbours,
            "secagg.threshold",
            self.threshold,
            f"must be <= secagg.neighbours ({self.neighbours})",
        )
        _require(
            math.isfinite(self.clip) and self.clip > 0,
            "secagg.clip",
            self.clip,
            "must be > 0 (updates are clipped to [-clip, clip] before quantization)",
        )
        _require(
            self.ring_bits in (0, 32, 64),
            "secagg.ring-bits",
            self.ring_bits,
            "must be 0 (auto), 32 or 64",
        )
        top = 24 if self.ring_bits == 32 else 56
        _require(
            2 <= self.bits <= top,
            "secagg.bits",
            self.bits,
            f"must be in [2, {top}] for ring-bits = {self.ring_bits} "
            "(the ring must also hold the total example count: N * 2^(bits-1) < 2^(ring-bits-1))",
        )
        _require(
            math.isfinite(self.stage_timeout) and self.stage_timeout > 0,
            "secagg.stage-timeout",
            self.stage_timeout,
            "must be > 0 seconds",
        )


@dataclass(frozen=True)
class Config:
    """A whole, validated fedcore run configuration."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def validate(self) -> None:
        """Validate every section, then the rules that span sections."""
        for f in fields(self):
            getattr(self, f.name).validate()
        s = self.strategy
        _require(
            s.min_available_clients <= self.run.clients,
            "strategy.min-available-clients",
            s.min_available_clients,
            f"must be <= run.clients ({self.run.clients})",
        )
        _require(
            s.min_train_clients <= self.run.clients,
            "strategy.min-train-clients",
            s.min_train_clients,
            f"must be <= run.clients ({self.run.clients})",
        )
        _require(
            not self.secagg.enabled or self.run.clients >= 3,
            "secagg.enabled",
            self.secagg.enabled,
            f"secure aggregation needs at least 3 clients per round, run.clients is "
            f"{self.run.clients}: use more clients or set [secagg] enabled = false",
        )

    def replace(self, **sections: Mapping[str, Any]) -> Config:
        """Return a validated copy with some keys of some sections changed.

        >>> Config().replace(run={"rounds": 2}).run.rounds
        2
        """
        raw = to_dict(self)
        for name, values in sections.items():
            raw.setdefault(name, {}).update(values)
        return config_from_dict(raw)


_SECTIONS: dict[str, type] = get_type_hints(Config)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _check_type(key: str, value: object, expected: type) -> object:
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, value, "must be a number")
        return float(value)
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    raise AssertionError(f"unsupported config field type {expected}")  # pragma: no cover


def _build_section(name: str, cls: type, raw: object) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(name, raw, f"must be a table [{name}]")
    hints = get_type_hints(cls)
    by_kebab = {_kebab(f.name): f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{name}.{key}"
        f = by_kebab.get(key)
        if f is None:
            raise ConfigError(
                dotted, value, f"unknown key; [{name}] accepts {', '.join(sorted(by_kebab))}"
            )
        if f.name == "kwargs":
            if not isinstance(value, Mapping):
                raise ConfigError(dotted, value, "must be a table [model.kwargs]")
            for k, v in value.items():
                if not isinstance(v, bool | int | float | str):
                    raise ConfigError(
                        f"{dotted}.{k}", v, "model kwargs must be booleans, numbers or strings"
                    )
            values["kwargs"] = FrozenMap(value)
            continue
        values[f.name] = _check_type(dotted, value, hints[f.name])
    return cls(**values)


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (parsed TOML)."""
    if not isinstance(raw, Mapping):
        raise ConfigError("<root>", raw, "a config must be a table of sections")
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        cls = _SECTIONS.get(name)
        if cls is None:
            raise ConfigError(
                name, value, f"unknown section; allowed sections: {', '.join(_SECTIONS)}"
            )
        sections[name] = _build_section(name, cls, value)
    cfg = Config(**sections)
    cfg.validate()
    return cfg


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate a TOML config file (``None``: all defaults).

    A relative ``data.path`` is taken relative to the config file's directory, so a
    config and its data file can be moved together.
    """
    if path is None:
        return config_from_dict({})
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("<file>", str(p), f"cannot be read ({exc.strerror})") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("<file>", str(p), f"is not valid TOML: {exc}") from exc
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and data["path"]:
        if not Path(data["path"]).is_absolute():
            raw["data"] = {**data, "path": str((p.parent / data["path"]).resolve())}
    return config_from_dict(raw)


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Nested plain-dict form with kebab-case keys (what a TOML file holds)."""
    out: dict[str, dict[str, Any]] = {}
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        table: dict[str, Any] = {}
        for sf in fields(section):
            value = getattr(section, sf.name)
            table[_kebab(sf.name)] = dict(value) if sf.name == "kwargs" else value
        out[f.name] = table
    return out


def to_flat(cfg: Config) -> dict[str, Scalar]:
    """Flat ``{"section.key": value}`` form: Flower's run config."""
    flat: dict[str, Scalar] = {}
    for section, table in to_dict(cfg).items():
        for key, value in table.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    flat[f"{section}.{key}.{k}"] = v
            else:
                flat[f"{section}.{key}"] = value
    return flat


def config_from_flat(flat: Mapping[str, Any]) -> Config:
    """Inverse of :func:`to_flat` (Flower hands apps this flat form)."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, value, f"conflicts with scalar key '{part}'")
            node = child
        node[parts[-1]] = value
    return config_from_dict(nested)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def to_toml(cfg: Config) -> str:
    """Render a config as TOML text that :func:`load_config` reads back identically."""
    lines: list[str] = []
    for section, table in to_dict(cfg).items():
        lines.append(f"[{section}]")
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        for key, value in table.items():
            if key not in nested:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for key, sub in nested.items():
            lines.append(f"[{section}.{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in sub.items())
            lines.append("")
    return "\n".join(lines)
