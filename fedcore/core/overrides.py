"""``--set KEY=VALUE``: change any config key on the command line (like Flower's ``--run-config``).

``KEY`` is the dotted config key (``train.lr``, ``secagg.enabled``,
``strategy.options.proximal-mu``); ``VALUE`` is a TOML value (``0.1``,
``true``, ``"fedprox"``, ``[1, 2]``); a bare word that is not TOML (``fedprox``,
``../mydata.npz``, ``mynets:make_model``) is read as a string::

    >>> parse_sets(["train.lr=0.1", "secagg.enabled=false", "strategy.name=fedprox"])
    {'train': {'lr': 0.1}, 'secagg': {'enabled': False}, 'strategy': {'name': 'fedprox'}}
    >>> parse_sets(["data.path=../site1.npz", "model.factory=mynets:make_model"])
    {'data': {'path': '../site1.npz'}, 'model': {'factory': 'mynets:make_model'}}
    >>> parse_sets(["strategy.options.proximal-mu=0.5"])
    {'strategy': {'options': {'proximal-mu': 0.5}}}
    >>> parse_sets(["train.lr=0.1.2"])
    Traceback (most recent call last):
    ...
    fedcore.core.errors.ConfigError: config key '--set' has value 'train.lr=0.1.2': ...

All ``--set`` flags of one command are applied together (:func:`apply_sets`), so
``--set run.clients=2 --set secagg.enabled=false`` is valid although either alone
is not; an unknown key gets the config's own error with "did you mean".
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from fedcore.core.config import SECTIONS, Config, declared_keys, to_dict
from fedcore.core.errors import ConfigError
from fedcore.core.keys import close_match

__all__ = ["SET_HELP", "apply_sets", "parse_sets"]

SET_HELP = (
    "set any config key, e.g. --set train.lr=0.05 --set secagg.enabled=false "
    "--set strategy.name=fedprox --set strategy.options.proximal-mu=0.1 (repeatable; VALUE "
    "in TOML syntax, a bare word is a string)"
)

#: A bare word read as a string: no spaces, quotes, brackets, '=' or ','; not number-like.
_BARE_WORD = re.compile(r"[^\s\"'\[\]{}=,#0-9+-][^\s\"'\[\]{}=,#]*")
_VALUE_HELP = (
    "VALUE must be a TOML value: a number (0.1, 3), true/false, an array ([1, 2]), a string "
    "(a bare word, or in double quotes for anything else: --set 'KEY=\"a b\"')"
)


def _value(item: str, text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if _BARE_WORD.fullmatch(text):
            return text
        raise ConfigError("--set", item, f"{text!r} is not a value; {_VALUE_HELP}") from None


def _key_hint(key: str) -> str:
    dotted = [info.dotted for info in declared_keys()]
    by_name = [d for d in dotted if d.split(".", 1)[1] == key]
    near = by_name[0] if by_name else close_match(key, dotted)
    return f"did you mean '{near}'? " if near else ""


def parse_sets(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["train.lr=0.1", ...]`` -> ``{"train": {"lr": 0.1}, ...}`` (keys checked later)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(
                "--set", item, "must be KEY=VALUE, e.g. --set train.lr=0.05 or --set run.rounds=3"
            )
        parts = key.split(".")
        if len(parts) < 2 or len(parts) > 3 or not all(parts):
            raise ConfigError(
                "--set",
                item,
                f"KEY must be a dotted config key SECTION.KEY (or SECTION.TABLE.KEY); "
                f"{_key_hint(key)}sections: {', '.join(SECTIONS)}",
            )
        if text == "":
            raise ConfigError("--set", item, f"has no value after '='; {_VALUE_HELP}")
        value = _value(item, text)
        table = out.setdefault(parts[0], {})
        if len(parts) == 2:
            table[parts[1]] = value
        else:
            sub = table.setdefault(parts[1], {})
            if not isinstance(sub, dict):
                raise ConfigError("--set", item, f"'{parts[0]}.{parts[1]}' is also set as a value")
            sub[parts[2]] = value
    return out


def apply_sets(
    cfg: Config,
    items: Sequence[str],
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """``cfg`` with every ``--set`` item (then ``extra``, e.g. ``--rounds``) applied at once.

    A ``SECTION.TABLE.KEY`` item changes one key of a table (``strategy.options``),
    keeping its other keys.
    """
    sets = parse_sets(items)
    for name, values in (extra or {}).items():
        sets.setdefault(name, {}).update(values)
    if not sets:
        return cfg
    current = to_dict(cfg)
    for name, values in sets.items():
        for k, v in list(values.items()):
            old = current.get(name, {}).get(k)
            if isinstance(v, dict) and isinstance(old, dict):
                values[k] = {**old, **v}
    return cfg.replace(**sets)
