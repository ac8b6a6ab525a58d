"""Client-side handlers behind ``clients/app.py``: local data -> local training -> reply.

A client reads only its own data:

- deployment: the file at ``node_config["data-path"]`` (``.npz`` or ``.csv``);
- simulation: partition ``node_config["partition-id"]`` of
  ``node_config["num-partitions"]`` (Flower's simulation keys).

The run config (``context.run_config``) carries the fedcore config in flat form;
per-round training settings arrive in the message's ``"config"`` record and
override it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcore.clientside.data import ClientData, client_data, load_file, split_local
from fedcore.clientside.models import build_model
from fedcore.clientside.training import TrainSettings, checked_metrics, make_loader, resolve_loops
from fedcore.core.config import Config, config_from_flat
from fedcore.core.errors import DataError
from fedcore.core.faults import crash_point
from fedcore.core.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, load_arrays, model_to_arrays
from fedcore.core.seeds import derive_seed

__all__ = ["handle_evaluate", "handle_train", "local_data"]

DATA_PATH = "data-path"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"


@functools.lru_cache(maxsize=8)
def _config(items: frozenset[tuple[str, Any]]) -> Config:
    return config_from_flat(dict(items))


def run_config(context: Context) -> Config:
    """The validated fedcore config carried by Flower's run config (cached)."""
    return _config(frozenset(context.run_config.items()))


@functools.lru_cache(maxsize=64)
def _file_data(
    path: str, label_column: str, num_classes: int, val_fraction: float, seed: int
) -> ClientData:
    data = load_file(path, label_column=label_column, num_classes=num_classes)
    return split_local(data, val_fraction, seed)


def local_data(cfg: Config, node_config: Mapping[str, Any]) -> ClientData:
    """The client's own data, from its data file or its simulation partition."""
    if DATA_PATH in node_config:
        return _file_data(
            str(node_config[DATA_PATH]),
            cfg.data.label_column,
            cfg.data.num_classes,
            cfg.data.val_fraction,
            derive_seed(cfg.run.seed, "file", str(node_config[DATA_PATH])),
        )
    if PARTITION_ID in node_config:
        num = int(node_config.get(NUM_PARTITIONS, cfg.run.clients))
        return client_data(
            cfg.data,
            seed=cfg.run.seed,
            partition_id=int(node_config[PARTITION_ID]),
            num_partitions=num,
        )
    raise DataError(
        f"this node has neither '{DATA_PATH}' nor '{PARTITION_ID}' in its node config; "
        f"start it with --node-config \"{DATA_PATH}='/path/to/data.npz'\""
    )


@functools.lru_cache(maxsize=8)
def _model(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> Any:
    # One model object per process and config; each call loads the global weights.
    return build_model(cfg.model, input_shape=input_shape, num_classes=num_classes)


def _client_key(context: Context) -> int | str:
    return context.node_config.get(PARTITION_ID, context.node_id)  # type: ignore[return-value]


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received global model on local data; reply arrays + metrics."""
    cfg = run_config(context)
    data = local_data(cfg, context.node_config)
    model = _model(cfg, data.train.input_shape, data.train.num_classes)
    load_arrays(model, msg.content.array_records[ARRAYS])
    conf = msg.content.config_records.get(CONFIG, ConfigRecord())
    server_round = int(conf.get("server-round", 0))
    crash_point("client-train", server_round=server_round)
    seed = derive_seed(cfg.run.seed, "train", server_round, _client_key(context))
    settings = TrainSettings.from_config(cfg.train, seed=seed)
    overrides = {k: conf[k] for k in ("lr", "local-epochs", "batch-size") if k in conf}
    if overrides:
        settings = TrainSettings(
            epochs=int(overrides.get("local-epochs", settings.epochs)),
            batch_size=int(overrides.get("batch-size", settings.batch_size)),
            lr=float(overrides.get("lr", settings.lr)),
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            optimizer=settings.optimizer,
            seed=seed,
        )
    train_fn, _ = resolve_loops(cfg.model)
    loader = make_loader(data.train, batch_size=settings.batch_size, shuffle=True, seed=seed)
    result = checked_metrics(train_fn(model, loader, settings), ("train_loss",), "train-fn")
    metrics = MetricRecord({**result, NUM_EXAMPLES: len(data.train)})
    return Message(RecordDict({ARRAYS: model_to_arrays(model), METRICS: metrics}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on local validation data."""
    cfg = run_config(context)
    data = local_data(cfg, context.node_config)
    model = _model(cfg, data.val.input_shape, data.val.num_classes)
    arrays: ArrayRecord = msg.content.array_records[ARRAYS]
    load_arrays(model, arrays)
    _, eval_fn = resolve_loops(cfg.model)
    loader = make_loader(data.val, batch_size=256, shuffle=False)
    result = checked_metrics(eval_fn(model, loader), ("loss", "accuracy"), "evaluate-fn")
    metrics = MetricRecord(
        {"eval_loss": result["loss"], "eval_acc": result["accuracy"], NUM_EXAMPLES: len(data.val)}
    )
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)
