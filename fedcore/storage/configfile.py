"""Reading a config file from disk into a validated :class:`~fedcore.core.config.Config`."""

from __future__ import annotations

import tomllib
from pathlib import Path

from fedcore.core.config import Config, config_from_dict
from fedcore.core.errors import ConfigError

__all__ = ["load_config"]


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
