"""Per-round metric loggers beside the run directory: TensorBoard (default) and MLflow (opt-in).

Both are observers (:class:`~fedcore.serverside.rounds.Observer`) that log every column of
:class:`~fedcore.serverside.rounds.RoundRecord` (the same names as ``metrics.csv``)
with the round as the step, skipping ``round`` itself and ``nan`` values:

- ``[run] tensorboard = true``: event files under ``<run-dir>/tensorboard/``
  (``tensorboard --logdir runs`` shows every run), written with ``tensorboardX``.
- ``[run] mlflow = true``: one MLflow run per fedcore run, its config as parameters,
  at ``run.mlflow-tracking-uri`` (empty: MLflow's own default, ``MLFLOW_TRACKING_URI``).
  Needs ``pip install 'fedcore[mlflow]'``; without it the run is refused before it
  starts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedcore.core.config import Config, to_flat
from fedcore.core.errors import ConfigError
from fedcore.core.records import Rejection
from fedcore.serverside.rounds import Observer, RoundRecord

__all__ = ["MlflowLogger", "TensorBoardLogger", "close_loggers", "run_loggers", "scalars_of"]

log = logging.getLogger("fedcore")

#: Sub-directory of the run directory holding the TensorBoard event files.
TENSORBOARD_DIR = "tensorboard"


def scalars_of(record: RoundRecord) -> dict[str, float]:
    """The record's logged scalars: every column but ``round``, ``nan`` left out."""
    return {
        k: float(v)
        for k, v in record.as_dict().items()
        if k != "round" and not math.isnan(float(v))
    }


class TensorBoardLogger(Observer):
    """Scalars per round into TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        from tensorboardX import SummaryWriter

        self.log_dir = log_dir
        self._writer = SummaryWriter(logdir=str(log_dir), flush_secs=3600)

    def round_finished(
        self, record: RoundRecord, arrays: ArrayRecord, rejected: Sequence[Rejection]
    ) -> None:
        """Add the round's scalars and flush them to disk."""
        for name, value in scalars_of(record).items():
            self._writer.add_scalar(name, value, record.round)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


def _import_mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ConfigError(
            "run.mlflow",
            True,
            "needs the mlflow package, which is not installed; install it with "
            "pip install 'fedcore[mlflow]' (or pip install mlflow-skinny), "
            "or set [run] mlflow = false",
        ) from None
    return mlflow


class MlflowLogger(Observer):
    """One MLflow run: the config as parameters, every column as a metric per round."""

    def __init__(self, cfg: Config, run_dir: Path, *, tracking_uri: str = "") -> None:
        mlflow = _import_mlflow()
        from mlflow.entities import Param

        self._metric = mlflow.entities.Metric
        self._client = mlflow.MlflowClient(tracking_uri=tracking_uri or None)
        name = "fedcore"
        experiment = self._client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id if experiment else self._client.create_experiment(name)
        )
        run = self._client.create_run(
            experiment_id, run_name=run_dir.name, tags={"fedcore.run-dir": str(run_dir)}
        )
        self.run_id: str = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(to_flat(cfg).items())]
        for i in range(0, len(params), 100):  # MLflow's per-batch limit
            self._client.log_batch(self.run_id, params=params[i : i + 100])

    def round_finished(
        self, record: RoundRecord, arrays: ArrayRecord, rejected: Sequence[Rejection]
    ) -> None:
        """Log the round's scalars with the round as the step."""
        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, record.round) for k, v in scalars_of(record).items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        """Mark the MLflow run finished."""
        self._client.set_terminated(self.run_id)


def run_loggers(cfg: Config, run_dir: Path) -> list[Observer]:
    """The loggers ``[run]`` enables for ``run_dir`` (each has ``close()``).

    ``ConfigError`` naming ``run.mlflow`` when MLflow is enabled but not installed.
    """
    loggers: list[Observer] = []
    if cfg.run.mlflow:
        loggers.append(MlflowLogger(cfg, run_dir, tracking_uri=cfg.run.mlflow_tracking_uri))
    if cfg.run.tensorboard:
        loggers.append(TensorBoardLogger(run_dir / TENSORBOARD_DIR))
    return loggers


def close_loggers(loggers: Sequence[Observer]) -> None:
    """Close each logger; one that fails is logged, not raised (the run's files are written)."""
    for logger in loggers:
        try:
            logger.close()  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - a logger must not fail a finished run
            log.warning("closing %s failed: %s", type(logger).__name__, exc)
