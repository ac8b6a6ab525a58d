"""Everything that can be checked before any training or process starts (simulate, deploy-local)."""

from __future__ import annotations

from pathlib import Path

from fedcore.core.config import Config
from fedcore.core.errors import ConfigError

__all__ = ["preflight"]


def _where(config_path: Path | None) -> str:
    places = ([str(config_path.resolve().parent)] if config_path is not None else []) + [
        str(Path.cwd())
    ]
    return " and ".join(dict.fromkeys(places))


def preflight(cfg: Config, *, config_path: Path | None = None, keep_data: bool = False) -> None:
    """Check the strategy, the data, the partitions, the model and the loops; raise why not.

    Import paths (``model.factory``, ``model.train-fn``, ``model.evaluate-fn``, a
    strategy ``module:Class``) are resolved as every fedcore process resolves them
    (:func:`fedcore.runtime.configfile.importable`: the config file's directory,
    then the working directory); a failure names the key and where it looked.

    ``keep_data``: the split stays cached in this process for its simulation clients
    (:func:`~fedcore.clientside.data.cached_simulation_split`; ``fedcore simulate``,
    whose forked workers then share it).
    """
    from fedcore.clientside.data import cached_simulation_split, simulation_split
    from fedcore.clientside.models import build_model
    from fedcore.clientside.training import resolve_loops
    from fedcore.runtime.serve import build_strategy

    if cfg.data.source == "file" and not Path(cfg.data.path).is_file():
        raise ConfigError(
            "data.path",
            cfg.data.path,
            "no such file; set data.path in the config (relative to the config file's "
            "directory), or --set data.path=FILE (relative to the working directory)",
        )
    try:
        build_strategy(cfg)  # its options, and whether secure aggregation allows it
        split = (cached_simulation_split if keep_data else simulation_split)(
            cfg.data, seed=cfg.run.seed, num_clients=cfg.run.clients
        )
        build_model(
            cfg.model, input_shape=split.test.input_shape, num_classes=split.test.num_classes
        )
        resolve_loops(cfg.model)
    except ConfigError as exc:
        if "cannot be imported" not in exc.allowed:
            raise
        raise ConfigError(
            exc.key, exc.value, f"{exc.allowed}; modules are looked for in {_where(config_path)}"
        ) from exc
