"""Config keys declared once: type, default, rule and help, all on the dataclass field.

A section of :mod:`fedcore.core.config` is a frozen dataclass whose fields are made by
:func:`key`; the field's annotation is the key's type::

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo(Section):
    ...     section = "demo"
    ...     rounds: int = key(20, help="federated rounds", rule=at_least(1))
    >>> try:
    ...     Demo(rounds=0).validate()
    ... except ConfigError as exc:
    ...     print(exc)
    config key 'demo.rounds' has value 0: must be an integer >= 1 (federated rounds)

From that one declaration come the type check, the range check and its message, the
table of keys in ``simulations/README.md`` and pyproject's Flower mirror
(:mod:`fedcore.storage.config_docs`). A :class:`Rule` both checks a value and says what is
allowed; rules that involve two keys stay in the section's :meth:`Section.cross_check`.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, get_type_hints

from fedcore.core.errors import ConfigError

__all__ = [
    "FrozenMap",
    "KeyInfo",
    "Rule",
    "Scalar",
    "Section",
    "at_least",
    "check_value_type",
    "close_match",
    "finite_positive",
    "greater_than",
    "import_path_or_empty",
    "in_range",
    "kebab",
    "key",
    "key_infos",
    "identifier_or_import_path",
    "non_empty",
    "one_of",
    "zero_or_at_least",
]

Scalar = bool | int | float | str


class FrozenMap(Mapping[str, Scalar]):
    """An immutable, hashable mapping (so a whole config can key a cache)."""

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


def kebab(name: str) -> str:
    """``out_dir`` -> ``out-dir`` (a field name as the key users write)."""
    return name.replace("_", "-")


def close_match(word: str, candidates: Sequence[str]) -> str | None:
    """The candidate ``word`` was most likely meant to be, if any is close."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def _num(x: float) -> str:
    return f"{x:g}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- rules


class Rule:
    """What one value may be: :meth:`ok` checks it, :meth:`allowed` says it in words."""

    def ok(self, value: Any) -> bool:  # pragma: no cover - every rule overrides it
        """Whether ``value`` (already of the key's type) is allowed."""
        raise NotImplementedError

    def allowed(self, kind: type) -> str:  # pragma: no cover - every rule overrides it
        """``"must be ..."``, for a key of type ``kind``."""
        raise NotImplementedError

    def problem(self, value: Any, kind: type) -> str | None:
        """``None`` if ``value`` is allowed, else what is allowed (and a likely fix)."""
        return None if self.ok(value) else self.allowed(kind)


def _integer(kind: type) -> str:
    return "an integer " if kind is int else ""


@dataclass(frozen=True)
class _Compare(Rule):
    op: str  # ">=" or ">"
    bound: float
    finite: bool

    def ok(self, value: Any) -> bool:
        if not _is_number(value) or (self.finite and not math.isfinite(value)):
            return False
        return bool(value >= self.bound if self.op == ">=" else value > self.bound)

    def allowed(self, kind: type) -> str:
        return f"must be {_integer(kind)}{self.op} {_num(self.bound)}"


def at_least(bound: float, *, finite: bool = True) -> Rule:
    """``value >= bound`` (and finite, unless ``finite=False``)."""
    return _Compare(">=", bound, finite)


def greater_than(bound: float, *, finite: bool = True) -> Rule:
    """``value > bound`` (and finite, unless ``finite=False``)."""
    return _Compare(">", bound, finite)


#: ``value > 0`` and finite: learning rates, concentrations, deadlines.
finite_positive: Rule = greater_than(0)


@dataclass(frozen=True)
class _Range(Rule):
    low: float
    high: float
    low_open: bool
    high_open: bool

    def ok(self, value: Any) -> bool:
        if not _is_number(value) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)

    def allowed(self, kind: type) -> str:
        lo, hi = _num(self.low), _num(self.high)
        if self.low_open and self.high_open:
            return f"must be {_integer(kind)}strictly between {lo} and {hi}"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"must be {_integer(kind)}in {left}{lo}, {hi}{right}"


def in_range(low: float, high: float, *, open: str = "") -> Rule:
    """``low <= value <= high``; ``open`` is ``""``, ``"low"``, ``"high"`` or ``"both"``.

    >>> in_range(0, 1, open="high").allowed(float)
    'must be in [0, 1)'
    """
    if open not in ("", "low", "high", "both"):
        raise ValueError(f"open must be '', 'low', 'high' or 'both', not {open!r}")
    return _Range(low, high, open in ("low", "both"), open in ("high", "both"))


@dataclass(frozen=True)
class _OneOf(Rule):
    choices: tuple[Any, ...]

    def ok(self, value: Any) -> bool:
        return any(value == c and type(value) is type(c) for c in self.choices)

    def allowed(self, kind: type) -> str:
        return f"must be one of {', '.join(str(c) for c in self.choices)}"

    def problem(self, value: Any, kind: type) -> str | None:
        if self.ok(value):
            return None
        text = self.allowed(kind)
        if isinstance(value, str):
            near = close_match(value, [str(c) for c in self.choices])
            if near is not None:
                text += f"; did you mean '{near}'?"
        return text


def one_of(*choices: Any) -> Rule:
    """The value is one of ``choices`` (a near miss gets "did you mean")."""
    return _OneOf(tuple(choices))


@dataclass(frozen=True)
class _ZeroOrAtLeast(Rule):
    bound: int

    def ok(self, value: Any) -> bool:
        return _is_number(value) and (value == 0 or value >= self.bound)

    def allowed(self, kind: type) -> str:
        return f"must be 0 (auto) or {_integer(kind)}>= {self.bound}"


def zero_or_at_least(bound: int) -> Rule:
    """0 (meaning "pick for me") or at least ``bound``."""
    return _ZeroOrAtLeast(bound)


@dataclass(frozen=True)
class _NonEmpty(Rule):
    what: str

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and value != ""

    def allowed(self, kind: type) -> str:
        return f"must be a non-empty {self.what}"


def non_empty(what: str = "string") -> Rule:
    """A non-empty string; ``what`` names it in the message (``"path"``)."""
    return _NonEmpty(what)


def _is_import_path(value: str) -> bool:
    module, sep, attr = value.partition(":")
    return bool(sep and module and attr)


@dataclass(frozen=True)
class _ImportPathOrEmpty(Rule):
    empty_means: str
    what: str

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and (value == "" or _is_import_path(value))

    def allowed(self, kind: type) -> str:
        return f"must be empty ({self.empty_means}) or an import path 'package.module:{self.what}'"


def import_path_or_empty(*, empty_means: str, what: str = "function") -> Rule:
    """``""`` (a built-in default) or ``"package.module:name"``."""
    return _ImportPathOrEmpty(empty_means, what)


@dataclass(frozen=True)
class _IdentifierOrImportPath(Rule):
    what: str
    where: str

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and (
            re.fullmatch(r"[a-z][a-z0-9_-]*", value) is not None or _is_import_path(value)
        )

    def allowed(self, kind: type) -> str:
        return (
            f"must be a built-in name ({self.where}) or an import path 'package.module:{self.what}'"
        )


def identifier_or_import_path(*, what: str, where: str) -> Rule:
    """A lowercase name that a registry elsewhere resolves, or ``"package.module:<what>"``.

    Which names exist is declared once, by the registry (``where`` says where to look);
    the config only checks the form, and the code that resolves the name refuses an
    unknown one with a "did you mean".
    """
    return _IdentifierOrImportPath(what, where)


# ----------------------------------------------------------------------------- keys


def key(
    default: Any,
    *,
    help: str,
    rule: Rule | None = None,
    choices: Sequence[Any] | None = None,
    resume_may_change: bool = False,
) -> Any:
    """Declare one config key: its default, one line of help and the rule it obeys.

    ``choices`` is shorthand for ``rule=one_of(*choices)``. ``resume_may_change`` marks
    a key that does not change which model a run produces, so ``--resume`` may use a
    different value (a deadline, the number of rounds).
    """
    if choices is not None:
        if rule is not None:
            raise TypeError("give rule or choices, not both")
        rule = one_of(*choices)
    metadata = {"help": help, "rule": rule, "resume_may_change": resume_may_change}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class KeyInfo:
    """Everything declared about one key (what docs and the Flower mirror are built from)."""

    section: str
    name: str  # kebab-case, as written in TOML
    attr: str  # the dataclass field name
    kind: type
    default: Any
    help: str
    rule: Rule | None
    resume_may_change: bool

    @property
    def dotted(self) -> str:
        """``"section.key"``."""
        return f"{self.section}.{self.name}"

    @property
    def is_table(self) -> bool:
        """Whether the key is a free-form table of scalars (``model.kwargs``)."""
        return self.kind is FrozenMap

    def allowed(self) -> str:
        """What the key accepts, in words."""
        if self.rule is not None:
            return self.rule.allowed(self.kind)
        return _TYPE_WORDS[self.kind]


_TYPE_WORDS: dict[type, str] = {
    bool: "must be true or false",
    int: "must be an integer",
    float: "must be a number",
    str: "must be a string",
    FrozenMap: "must be a table of booleans, numbers or strings",
}


@functools.cache
def key_infos(cls: type[Section]) -> tuple[KeyInfo, ...]:
    """The declared keys of one section class, in declaration order."""
    hints = get_type_hints(cls)
    out: list[KeyInfo] = []
    for f in fields(cls):  # type: ignore[arg-type]
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with key(..., help=...)")
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:  # pragma: no cover - key() always gives a default
            raise TypeError(f"{cls.__name__}.{f.name} has no default")
        out.append(
            KeyInfo(
                section=cls.section,
                name=kebab(f.name),
                attr=f.name,
                kind=hints[f.name],
                default=default,
                help=f.metadata["help"],
                rule=f.metadata["rule"],
                resume_may_change=f.metadata["resume_may_change"],
            )
        )
    return tuple(out)


def check_value_type(info: KeyInfo, value: object, *, key: str | None = None) -> Any:
    """``value`` as the key's type (an int is a fine float), or :class:`ConfigError`."""
    dotted = key or info.dotted
    kind = info.kind
    ok: bool
    if kind is float:
        ok = _is_number(value)
        value = float(value) if ok else value  # type: ignore[arg-type]
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is bool:
        ok = isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is FrozenMap:
        if not isinstance(value, Mapping):
            raise ConfigError(dotted, value, f"must be a table [{dotted}] ({info.help})")
        for k, v in value.items():
            if not isinstance(v, bool | int | float | str):
                raise ConfigError(
                    f"{dotted}.{k}",
                    v,
                    f"{dotted} values must be booleans, numbers or strings ({info.help})",
                )
        return FrozenMap(value)
    else:  # pragma: no cover - a declaration error, caught by the tests
        raise AssertionError(f"unsupported config key type {kind}")
    if not ok:
        raise ConfigError(dotted, value, f"{_TYPE_WORDS[kind]} ({info.help})")
    return value


class Section:
    """Base of a config section: a frozen dataclass of :func:`key` fields.

    :meth:`validate` checks every field's rule, then :meth:`cross_check`, where a
    section keeps the rules that involve more than one of its keys.
    """

    section: ClassVar[str]

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first bad value."""
        for info in key_infos(type(self)):
            if info.rule is None:
                continue
            value = getattr(self, info.attr)
            problem = info.rule.problem(value, info.kind)
            if problem is not None:
                raise ConfigError(info.dotted, value, f"{problem} ({info.help})")
        self.cross_check()

    def cross_check(self) -> None:
        """Rules spanning several keys of this section (none by default)."""
