"""Finding config files, and making modules beside them importable (model factories, loops)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["DEFAULT_CONFIG", "default_config_path", "importable"]

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "simulations" / "default.toml"


def default_config_path() -> Path | None:
    """``simulations/default.toml`` in the working directory, else the shipped one."""
    for candidate in (Path("simulations/default.toml"), DEFAULT_CONFIG):
        if candidate.is_file():
            return candidate
    return None


def importable(config_path: Path | None) -> None:
    """Make modules next to the config file (and in the working directory) importable.

    ``model.factory = "mynets:make_model"`` then finds ``mynets.py`` beside the
    config, in this process and in the engine's worker processes.
    """
    extra = [str(Path.cwd())]
    if config_path is not None:
        extra.insert(0, str(config_path.resolve().parent))
    for entry in reversed(extra):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    current = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([*extra, *([current] if current else [])])
