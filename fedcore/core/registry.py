"""Name -> object registries with loud duplicates, and import-path resolution."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from fedcore.core.errors import ConfigError

__all__ = ["Registry", "import_object", "resolve_callable"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict of named plug-ins.

    >>> r: Registry[int] = Registry("number")
    >>> r.register("one", 1)
    >>> r.get("one")
    1
    >>> r.register("one", 2)
    Traceback (most recent call last):
    ...
    ValueError: number 'one' is already registered; pass force=True to replace it
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, force: bool = False) -> None:
        """Add ``item`` under ``name``; raise on a duplicate unless ``force``."""
        if name in self._items and not force:
            raise ValueError(
                f"{self.kind} '{name}' is already registered; pass force=True to replace it"
            )
        self._items[name] = item

    def get(self, name: str) -> T:
        """Return the item registered as ``name`` (``KeyError`` if absent)."""
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


def import_object(path: str, *, key: str, where: str = "") -> Any:
    """Import ``"package.module:attribute"``; a failure names the config ``key``.

    ``where`` (e.g. "it is looked up beside the config file") is added to the message
    of a module that cannot be imported.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(key, path, "must be an import path of the form 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(
            key,
            path,
            f"module '{module_name}' cannot be imported ({type(exc).__name__}: {exc})"
            + (f"; {where}" if where else ""),
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                key, path, f"module '{module_name}' has no attribute '{attr}'"
            ) from None
    if not callable(obj):
        raise ConfigError(key, path, f"'{attr}' is a {type(obj).__name__}, not a callable")
    return obj


def resolve_callable(
    name_or_path: str, registry: Registry[Callable[..., Any]], *, key: str
) -> Callable[..., Any]:
    """A registered name, else an import path."""
    if name_or_path in registry:
        return registry.get(name_or_path)
    if ":" not in name_or_path:
        raise ConfigError(
            key,
            name_or_path,
            f"must be one of {', '.join(registry)} or an import path 'package.module:name'",
        )
    return import_object(name_or_path, key=key)
