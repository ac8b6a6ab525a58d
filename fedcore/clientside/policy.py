"""The client decides what runs: its own config, plain rounds only if allowed, bounded settings.

The server controls Flower's run config (``context.run_config``), so a client never
takes its model, loops, data settings or secure-aggregation minimums from it. Every
client-side read of the fedcore config goes through :func:`local_config`:

- node config ``client-config`` (:data:`CLIENT_CONFIG`): a fedcore TOML file, the
  client's own (``fedcore client --config FILE`` sets it; the embedded engine sets it
  to the file the simulation was started from), validated and cached by
  ``(path, mtime)``;
- otherwise a simulation node (node config ``partition-id``): the run config; one
  user owns both sides of a simulation, and Flower's Ray engine (``flwr run .``)
  passes nothing else (keys outside fedcore's sections, e.g. a stock ServerApp's
  ``num-server-rounds``, are ignored and logged once);
- otherwise (a deployment node): the library defaults, ``Config()``, never the run
  config (logged once, with how to pass ``--config``).

On top of that config, :func:`plain_round_mod` refuses plain ``train``/``evaluate``
messages unless this client allows them (:func:`allows_plain`), and
:func:`checked_hyperparameters` refuses server-sent ``lr``/``local-epochs``/
``batch-size`` outside the client's own ``[train]`` bounds.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedcore.core.config import Config, config_from_flat, declared_keys
from fedcore.core.errors import ConfigError
from fedcore.core.keys import close_match
from fedcore.storage.configfile import load_config

__all__ = [
    "ALLOW_PLAIN",
    "CLIENT_CONFIG",
    "PlainRoundRefused",
    "allows_plain",
    "checked_hyperparameters",
    "client_config_file",
    "local_config",
    "plain_round_mod",
    "run_config",
]

log = logging.getLogger("fedcore")

#: Node-config key: path of the client's own fedcore TOML file.
CLIENT_CONFIG = "client-config"
#: Node-config key: ``True`` lets this client answer plain (unmasked) rounds.
ALLOW_PLAIN = "allow-plain"
#: Node-config key Flower's simulation engines give each virtual client.
PARTITION_ID = "partition-id"

_defaults_logged = False


@functools.lru_cache(maxsize=8)
def _flat_config(items: frozenset[tuple[str, Any]]) -> Config:
    cfg = config_from_flat(dict(items))
    if cfg.app:  # once per run config (cached)
        log.warning(
            "fedcore's ClientApp ignores these run-config keys outside its sections: %s",
            ", ".join(_with_hint(k) for k in sorted(cfg.app)),
        )
    return cfg


def _with_hint(name: str) -> str:
    """``"trian.lr (did you mean 'train.lr'?)"`` for a dotted near miss, else ``name``."""
    if "." not in name:
        return name
    near = close_match(name, [info.dotted for info in declared_keys()])
    return f"{name} (did you mean '{near}'?)" if near else name


def run_config(context: Context) -> Config:
    """The validated fedcore config carried by Flower's run config (cached).

    Only for a simulation node (see :func:`local_config`): the server writes it. Keys
    outside fedcore's sections (a stock ServerApp's ``num-server-rounds``, ``[app]``
    keys meant for stock ClientApps) are ignored, and logged once; a bad key inside a
    section (``train.lrr``) is a :class:`~fedcore.core.errors.ConfigError`.
    """
    return _flat_config(frozenset(context.run_config.items()))


@functools.lru_cache(maxsize=8)
def _file_config(path: str, mtime_ns: int) -> Config:
    del mtime_ns  # part of the cache key: an edited file is read again
    return load_config(path)


@functools.lru_cache(maxsize=64)
def _resolved(path: str) -> str:
    return str(Path(path).resolve())


def client_config_file(path: str | os.PathLike[str]) -> Config:
    """The validated config in the client's TOML file (cached by path and mtime)."""
    p = str(Path(path).expanduser())
    # Resolving the path cost ~5% of a simulation worker's time (two calls per message,
    # the 1,000-client round, py-spy); an absolute path's resolution is kept per
    # process, a relative one (it depends on the working directory) is resolved anew.
    p = _resolved(p) if os.path.isabs(p) else str(Path(p).resolve())
    try:
        mtime = os.stat(p).st_mtime_ns
    except OSError as exc:
        raise ConfigError(
            f"node config '{CLIENT_CONFIG}'",
            str(path),
            f"cannot be read ({exc.strerror}); pass an existing fedcore TOML file with "
            "fedcore client --config FILE",
        ) from exc
    return _file_config(p, mtime)


def local_config(context: Context) -> Config:
    """The client's own fedcore config: its file, the simulation's, or the defaults.

    Never the run config of a deployment node (the server writes that); see the
    module docstring for the order.
    """
    global _defaults_logged
    node = context.node_config
    if CLIENT_CONFIG in node:
        return client_config_file(str(node[CLIENT_CONFIG]))
    if PARTITION_ID in node:
        return run_config(context)
    if not _defaults_logged:
        _defaults_logged = True
        log.warning(
            "this client has no config of its own: using fedcore's built-in defaults "
            "(never the server's run config); pass one with fedcore client --config "
            "client.toml (node config '%s')",
            CLIENT_CONFIG,
        )
    return Config()


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def allows_plain(context: Context, *, evaluate: bool = False) -> bool:
    """Whether this client answers plain ``train`` (or ``evaluate``) messages.

    Yes when its own config turns secure aggregation off (``secagg.enabled = false``;
    for evaluation also ``secagg.evaluate = false``) or its node config has
    ``allow-plain`` true (``fedcore client --allow-plain``).
    """
    if _flag(context.node_config.get(ALLOW_PLAIN, False)):
        return True
    cfg = local_config(context).secagg
    return not cfg.enabled or (evaluate and not cfg.evaluate)


class PlainRoundRefused(ConfigError):
    """A plain round reached a client that requires secure aggregation."""

    def __init__(self, message_type: str) -> None:
        super().__init__(
            "secagg.enabled",
            True,
            f"this client requires secure aggregation and refuses a plain "
            f"'{message_type}' message (it would reveal its update to the server); to "
            "allow plain rounds set secagg.enabled = false in the client's config "
            "(fedcore client --config FILE) or start it with fedcore client --allow-plain",
        )


Handler = Callable[[Message, Context], Message]


def plain_round_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """A Flower ``Mod`` for the plain handlers: refuse unless :func:`allows_plain`.

    Register it on the plain ``train``/``evaluate`` functions only (never on
    ``train.secagg``)::

        @app.train(mods=[plain_round_mod])
        def train(msg, context): ...

    The refusal is raised (Flower's ClientApp runtime and fedcore's engines turn it
    into the reply's error, so the server sees why) and logged here, on the client.
    """
    message_type = msg.metadata.message_type
    if not allows_plain(context, evaluate=message_type.startswith("evaluate")):
        exc = PlainRoundRefused(message_type)
        log.error("refused a plain round: %s", exc)
        raise exc
    return call_next(msg, context)


def _bounded(
    conf: Mapping[str, Any],
    key: str,
    default: float,
    *,
    low: float,
    high: float,
    low_key: str | None,
    high_key: str,
    integer: bool,
) -> float:
    value = conf.get(key, default)
    kind = "an integer" if integer else "a finite number"
    lower = f"{low:g}" if low_key is None else f"{low_key} = {low:g}"
    bounds = f"[{lower}, {high_key} = {high:g}]"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
        or not math.isfinite(value)
    ):
        raise ConfigError(
            key,
            value,
            f"must be {kind} within this client's bounds {bounds} "
            "(sent by the server in the training message's config); refusing to train",
        )
    if not low <= value <= high:
        raise ConfigError(
            key,
            value,
            f"{key} = {value!r} is outside this client's bounds {bounds} (its own "
            "config's [train] section); refusing to train",
        )
    return value


def checked_hyperparameters(cfg: Config, conf: Mapping[str, Any]) -> tuple[float, int, int]:
    """``(lr, local-epochs, batch-size)``: the message's values, else the client's own.

    Each server-sent value must lie within the client's ``[train]`` bounds
    (``min-lr``..``max-lr``, 1..``max-local-epochs``, 1..``max-batch-size``); one
    outside them, a bool, NaN or infinity is refused, never clamped.

    >>> from fedcore.core.config import Config
    >>> checked_hyperparameters(Config(), {"lr": 0.1})
    (0.1, 2, 32)
    >>> checked_hyperparameters(Config(), {"lr": 1e-9})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fedcore.core.errors.ConfigError: ...lr = 1e-09 is outside this client's bounds [train.min-lr...
    """
    t = cfg.train
    lr = _bounded(
        conf,
        "lr",
        t.lr,
        low=t.min_lr,
        high=t.max_lr,
        low_key="train.min-lr",
        high_key="train.max-lr",
        integer=False,
    )
    epochs = _bounded(
        conf,
        "local-epochs",
        t.local_epochs,
        low=1,
        high=t.max_local_epochs,
        low_key=None,
        high_key="train.max-local-epochs",
        integer=True,
    )
    batch = _bounded(
        conf,
        "batch-size",
        t.batch_size,
        low=1,
        high=t.max_batch_size,
        low_key=None,
        high_key="train.max-batch-size",
        integer=True,
    )
    return float(lr), int(epochs), int(batch)
