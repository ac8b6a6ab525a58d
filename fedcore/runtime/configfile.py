"""Finding config files, and making modules beside them importable (model factories, loops).

Also the user's own ClientApp (``fedcore simulate --client-app module:attr``,
``fedcore server --client-app``): :func:`load_client_app` checks it before any process
starts, and :func:`client_app_sources` collects the files a FAB ships of it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from fedcore.core.errors import ConfigError
from fedcore.core.registry import import_object

__all__ = [
    "DEFAULT_CONFIG",
    "client_app_sources",
    "default_config_path",
    "importable",
    "load_client_app",
]

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


#: A FAB may not carry more than this of the user's ClientApp sources.
MAX_SOURCES_BYTES = 8 * 2**20


def _where(config_path: Path | None) -> str:
    here = [str(Path.cwd())]
    if config_path is not None:
        here.insert(0, str(config_path.resolve().parent))
    return " and ".join(dict.fromkeys(here))


def load_client_app(path: str, *, flag: str, config_path: Path | None = None) -> Any:
    """Import the ClientApp ``"module:attr"`` names (after :func:`importable`), or say why not.

    Raises :class:`ConfigError` naming ``flag`` (``--client-app``) when the form is
    wrong, the module cannot be imported (its own traceback is chained), the
    attribute is missing or is not a ``flwr.clientapp.ClientApp``.
    """
    from flwr.clientapp import ClientApp

    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(flag, path, "must be 'module:attribute', e.g. --client-app my_client:app")
    app = import_object(
        path,
        key=flag,
        where=f"it is looked up beside the config file and in the working directory "
        f"({_where(config_path)}), then on sys.path",
    )
    if not isinstance(app, ClientApp):
        raise ConfigError(
            flag,
            path,
            f"'{attr}' is a {type(app).__name__}, not a flwr.clientapp.ClientApp "
            "(app = ClientApp(), with @app.train() and @app.evaluate() handlers)",
        )
    return app


def client_app_sources(path: str, *, flag: str) -> dict[str, bytes]:
    """The ``.py`` files a FAB ships so a SuperNode can import ``path`` (``"module:attr"``).

    For ``pkg.sub.module`` the whole top-level package ``pkg/`` (its ``.py`` files, so
    sibling imports work, as in Flower's own app layout); for a top-level
    ``module`` the ``.py`` files of its directory. Keys are paths inside the FAB.
    """
    module_name = path.partition(":")[0]
    top = module_name.split(".", 1)[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        raise ConfigError(flag, path, f"module '{top}' has no source file to ship to the clients")
    if spec.submodule_search_locations:  # a package: ship it whole
        root = Path(next(iter(spec.submodule_search_locations)))
        base = root.parent
        files = sorted(root.rglob("*.py"))
    else:
        base = Path(str(spec.origin)).parent
        files = sorted(base.glob("*.py"))
    out: dict[str, bytes] = {}
    total = 0
    for f in files:
        rel = f.relative_to(base)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        data = f.read_bytes()
        total += len(data)
        if total > MAX_SOURCES_BYTES:
            raise ConfigError(
                flag,
                path,
                f"its sources under {base} exceed {MAX_SOURCES_BYTES // 2**20} MiB; put the "
                "ClientApp in a small package or directory of its own",
            )
        out[rel.as_posix()] = data
    return out
