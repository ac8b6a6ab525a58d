"""Client-side handlers behind ``clients/app.py``: local data -> local training -> reply.

A client reads only its own data:

- deployment: the file at ``node_config["data-path"]`` (``.npz`` or ``.csv``);
- simulation: partition ``node_config["partition-id"]`` of
  ``node_config["num-partitions"]`` (Flower's simulation keys).

Everything the client builds (model, loops, data settings, ``[train]``, its seeds)
comes from its *own* config, :func:`~fedcore.clientside.policy.local_config`, never
from the server's run config on a deployment node. Per-round ``lr``, ``local-epochs``
and ``batch-size`` in the message's ``"config"`` record override the client's own
values only within its ``[train]`` bounds
(:func:`~fedcore.clientside.policy.checked_hyperparameters`); ``attempt`` (a retried
round) is mixed into the training seed.

What strategies add to a training message, and what the client does with it:

- ``proximal-mu`` in the config (FedProx): the loop adds ``mu/2 ||w - w_global||^2``
  (:meth:`~fedcore.clientside.training.TrainSettings.regularize`); a negative or
  non-finite value is refused.
- an ArrayRecord ``"scaffold.c"`` (SCAFFOLD): the loop corrects every gradient by
  ``w (c - c_i)`` (:meth:`~fedcore.clientside.training.TrainSettings.correct`;
  ``w`` = ``scaffold-correction-weight``, 1 in the paper); after training the client
  sets ``c_i+`` by the paper's option I (``scaffold-option = 1``: the gradient of its
  first step, taken at the global model ``x``) or option II (``2``:
  ``w (c_i - c) + (x - y) / (K lr)``), replies ``"scaffold.delta-c" = c_i+ - c_i``
  beside its model and stores ``c_i+`` in its :class:`~fedcore.clientside.state.ClientState`
  (``c_i = 0`` before its first round).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcore.clientside.data import ClientData, client_data, load_file, split_local
from fedcore.clientside.models import build_model
from fedcore.clientside.policy import (
    PARTITION_ID,
    checked_hyperparameters,
    local_config,
    run_config,
)
from fedcore.clientside.state import ClientState
from fedcore.clientside.training import (
    TrainSettings,
    call_loop,
    control_variate_update,
    make_loader,
    resolve_loops,
    step_size_sum,
)
from fedcore.core.aggregation import array_view, numpy_to_array
from fedcore.core.config import Config
from fedcore.core.errors import AggregationError, ConfigError, DataError, ModelError
from fedcore.core.faults import crash_point
from fedcore.core.records import (
    ARRAYS,
    ATTEMPT,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    load_arrays,
    model_to_arrays,
)
from fedcore.core.seeds import derive_seed

__all__ = [
    "CONTROL",
    "CONTROL_DELTA",
    "PROXIMAL_MU",
    "SCAFFOLD_OPTION",
    "SCAFFOLD_WEIGHT",
    "ScaffoldClient",
    "attempt",
    "handle_evaluate",
    "handle_train",
    "local_data",
    "prepare",
    "proximal_mu",
    "run_config",
    "scaffold_option",
    "scaffold_weight",
]

log = logging.getLogger("fedcore")

DATA_PATH = "data-path"
NUM_PARTITIONS = "num-partitions"
#: Training-config key of FedProx's ``mu`` (the server's ``FedProx.train_config``).
PROXIMAL_MU = "proximal-mu"
#: ArrayRecord names of SCAFFOLD's control variates (the server's ``Scaffold`` uses the same).
CONTROL = "scaffold.c"
CONTROL_DELTA = "scaffold.delta-c"
#: Training-config key choosing SCAFFOLD's control-variate update (1 or 2; absent: 1).
SCAFFOLD_OPTION = "scaffold-option"
#: Training-config key: the weight of ``c - c_i`` in each corrected gradient (absent: 1).
SCAFFOLD_WEIGHT = "scaffold-correction-weight"
#: Client-state item holding SCAFFOLD's ``c_i``.
SCAFFOLD_STATE = "scaffold"


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


def _plain_loading(model: torch.nn.Module) -> bool:
    """Whether ``load_state_dict`` on ``model`` would only copy tensors (no hooks)."""
    for m in model.modules():
        own = type(m)._load_from_state_dict
        if own is not torch.nn.Module._load_from_state_dict and own is not _NORM_LOAD:
            return False
        if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks:
            return False
    return True


_NORM_LOAD = torch.nn.modules.batchnorm._NormBase._load_from_state_dict


def load_global(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Load the global ``arrays`` into ``model``: the values ``load_arrays`` would load.

    Measured on the 1,000-client round (py-spy, the worker process): Flower's
    ``ArrayRecord.to_torch_state_dict`` runs ``np.load`` per array (its header parsed
    with ``ast.literal_eval``) and ``load_state_dict`` walks every module, about 20%
    of a client's time. Here each ``.npy`` payload is viewed in place
    (:func:`~fedcore.core.aggregation.array_view`) and copied into the model's own
    tensor memory: the same bytes, so the same model. Anything else (other keys,
    shapes or dtypes, load hooks, a tensor numpy cannot view) takes ``load_arrays``,
    whose errors name the difference.
    """
    state = model.state_dict()
    if arrays.keys() != state.keys() or not _plain_loading(model):
        load_arrays(model, arrays)
        return
    pairs = []
    try:
        for name, tensor in state.items():
            view = array_view(arrays[name])
            target = tensor.numpy()
            if view.shape != target.shape or view.dtype != target.dtype:
                raise AggregationError(f"array '{name}' does not match the model")
            pairs.append((target, view))
    except (AggregationError, RuntimeError, TypeError):
        load_arrays(model, arrays)
        return
    for target, view in pairs:
        np.copyto(target, view, casting="no")


@functools.lru_cache(maxsize=8)
def _model(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> Any:
    # One model object per process and config; each call loads the global weights.
    return build_model(cfg.model, input_shape=input_shape, num_classes=num_classes)


def _client_key(context: Context) -> int | str:
    return context.node_config.get(PARTITION_ID, context.node_id)  # type: ignore[return-value]


def _number(
    conf: Mapping[str, Any], key: str, default: float, ok: Callable[[float], bool], allowed: str
) -> float:
    """A finite number from a training message's config that ``ok`` accepts, else refused."""
    value = conf.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and ok(value))
    ):
        raise ConfigError(key, value, allowed)
    return float(value)


def proximal_mu(conf: Mapping[str, Any]) -> float:
    """FedProx's ``mu`` from a training message's config (0 when absent), checked.

    >>> proximal_mu({"proximal-mu": 0.1}), proximal_mu({})
    (0.1, 0.0)
    """
    return _number(
        conf,
        PROXIMAL_MU,
        0.0,
        lambda v: v >= 0,
        "must be a finite number >= 0 (FedProx's proximal weight, sent by the server "
        "in the training message's config); refusing to train",
    )


def scaffold_option(conf: Mapping[str, Any]) -> int:
    """SCAFFOLD's control-variate update from a training message's config (1 when absent)."""
    value = conf.get(SCAFFOLD_OPTION, 1)
    if isinstance(value, bool) or value not in (1, 2):
        raise ConfigError(
            SCAFFOLD_OPTION,
            value,
            "must be 1 (option I: gradient at the global model) or 2 (option II: from the "
            "local drift), sent by the server in the training message's config",
        )
    return int(value)


def scaffold_weight(conf: Mapping[str, Any]) -> float:
    """The weight of SCAFFOLD's correction from a training message's config (1 when absent)."""
    return _number(
        conf,
        SCAFFOLD_WEIGHT,
        1.0,
        lambda v: 0 < v <= 1,
        "must be a number in (0, 1] (the weight of c - c_i in each corrected gradient), "
        "sent by the server in the training message's config",
    )


@dataclasses.dataclass
class ScaffoldClient:
    """SCAFFOLD's client side for one round (Karimireddy et al. 2020, Algorithm 1).

    ``start`` reads ``c`` (from the message) and ``c_i`` (from the client state, zeros
    before the client's first round) and gives the per-parameter correction
    ``c - c_i``; ``finish`` applies option I or II after training, stores ``c_i+`` and
    returns the reply record ``c_i+ - c_i``.

    Parameters
    ----------
    control : dict of str to ndarray
        ``c`` by array name (float64).
    local : dict of str to ndarray
        ``c_i`` by array name (float64).
    global_arrays : dict of str to ndarray
        ``x``, the global model the round started from (float64).
    dtypes : dict of str to numpy dtype
        The model's dtype per array (the reply record uses them).
    option : int (default: 1)
        The paper's control-variate update: 1, ``c_i+ = g_i(x)`` (the first local
        step's gradient, at the global model); 2, ``c_i+ = w (c_i - c) + (x - y) / (K lr)``
        (with :func:`~fedcore.clientside.training.step_size_sum` for ``K lr`` under
        momentum): the mean uncorrected gradient along the local trajectory.
    weight : float (default: 1.0)
        ``w``: each local gradient is corrected by ``w (c - c_i)``; 1 is the paper's.

    """

    control: dict[str, np.ndarray]
    local: dict[str, np.ndarray]
    global_arrays: dict[str, np.ndarray]
    dtypes: dict[str, np.dtype]
    option: int = 1
    weight: float = 1.0

    @classmethod
    def start(
        cls,
        control: ArrayRecord,
        arrays: ArrayRecord,
        state: ClientState,
        server_round: int,
        *,
        option: int = 1,
        weight: float = 1.0,
    ) -> ScaffoldClient:
        """Read ``c`` and the stored ``c_i`` and check both against the model."""
        x = {name: array_view(a) for name, a in arrays.items()}
        c = {name: array_view(a) for name, a in control.items()}
        _same_layout(CONTROL, c, x)
        stored = state.load(SCAFFOLD_STATE, server_round)
        if stored is None:
            c_i = {name: np.zeros(v.shape, np.float64) for name, v in x.items()}
        else:
            _same_layout("the stored SCAFFOLD c_i", stored, x, dtypes=False)
            c_i = {name: np.asarray(v, np.float64) for name, v in stored.items()}
        return cls(
            control={k: v.astype(np.float64) for k, v in c.items()},
            local=c_i,
            global_arrays={k: v.astype(np.float64) for k, v in x.items()},
            dtypes={k: v.dtype for k, v in x.items()},
            option=option,
            weight=weight,
        )

    def correction(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``w (c - c_i)`` for each trainable parameter, as tensors like the parameter."""
        return {
            name: torch.from_numpy(self.weight * (self.control[name] - self.local[name])).to(
                p.dtype
            )
            for name, p in model.named_parameters()
            if p.requires_grad and name in self.control
        }

    def finish(
        self,
        model: torch.nn.Module,
        trained: ArrayRecord,
        settings: TrainSettings,
        state: ClientState,
        server_round: int,
    ) -> ArrayRecord:
        """Option I or II from the local steps; store ``c_i+``; the ``delta-c`` record."""
        steps = settings.local_steps
        first = settings.counter.first_gradient
        if steps == 0 or first is None:
            raise ModelError(
                "SCAFFOLD: the train function never called settings.correct(model); call it "
                "after loss.backward() and before each optimizer step"
            )
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if self.option == 1:
            new = {
                name: first[name] if name in names and name in first else ci
                for name, ci in self.local.items()
            }
            delta = {name: new[name] - ci for name, ci in self.local.items()}
        else:
            y = {name: array_view(a) for name, a in trained.items()}
            new, delta = control_variate_update(
                self.control,
                self.local,
                self.global_arrays,
                y,
                step_sum=step_size_sum(settings.lr, settings.momentum, steps),
                names=names,
                weight=self.weight,
            )
        state.save(SCAFFOLD_STATE, server_round, new)
        return ArrayRecord(
            {name: numpy_to_array(d.astype(self.dtypes[name])) for name, d in delta.items()}
        )


def _same_layout(
    what: str,
    got: Mapping[str, np.ndarray],
    model: Mapping[str, np.ndarray],
    *,
    dtypes: bool = True,
) -> None:
    if got.keys() != model.keys():
        raise ModelError(
            f"{what} does not match the model: arrays {sorted(got)} vs {sorted(model)}"
        )
    for name, arr in got.items():
        ref = model[name]
        if arr.shape != ref.shape or (dtypes and arr.dtype != ref.dtype):
            raise ModelError(
                f"{what}: array '{name}' is {arr.dtype}{list(arr.shape)}, "
                f"the model has {ref.dtype}{list(ref.shape)}"
            )


def attempt(conf: Mapping[str, Any]) -> int:
    """Which attempt at the round a training message is (0 when absent), checked.

    >>> attempt({"attempt": 2}), attempt({})
    (2, 0)
    """
    value = conf.get(ATTEMPT, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            ATTEMPT,
            value,
            "must be an integer >= 0 (the attempt at this round, sent in the training "
            "message's config; absent means 0)",
        )
    return value


def train_seed(
    cfg: Config, server_round: int, client_key: int | str, conf: Mapping[str, Any]
) -> int:
    """The seed of one local training: (run seed, "train", round, client[, attempt]).

    Attempt 0 (or none) gives the seed of a first attempt; a retried round
    (``attempt`` > 0) shuffles and drops out anew.
    """
    n = attempt(conf)
    parts: tuple[int | str, ...] = ("train", server_round, client_key, *((n,) if n else ()))
    return derive_seed(cfg.run.seed, *parts)


def _settings(cfg: Config, conf: Mapping[str, Any], seed: int) -> TrainSettings:
    settings = TrainSettings.from_config(cfg.train, seed=seed)
    lr, epochs, batch_size = checked_hyperparameters(cfg, conf)
    return dataclasses.replace(settings, epochs=epochs, batch_size=batch_size, lr=lr)


def prepare(context: Context) -> None:
    """Load this client's data and build its model now (both cached), or raise why not.

    ``fedcore client`` calls it before joining, so a data file that does not fit the
    client's config fails at start, not in the first round.
    """
    cfg = local_config(context)
    data = local_data(cfg, context.node_config)
    _model(cfg, data.train.input_shape, data.train.num_classes)
    resolve_loops(cfg.model)


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received global model on local data; reply arrays + metrics.

    With the strategy's extras (see the module docstring): FedProx's proximal term,
    SCAFFOLD's correction and its ``"scaffold.delta-c"`` reply record.
    """
    cfg = local_config(context)
    conf = msg.content.config_records.get(CONFIG, ConfigRecord())
    server_round = int(conf.get("server-round", 0))
    seed = train_seed(cfg, server_round, _client_key(context), conf)
    settings = _settings(cfg, conf, seed)  # refused before any work if out of bounds
    data = local_data(cfg, context.node_config)
    model = _model(cfg, data.train.input_shape, data.train.num_classes)
    arrays = msg.content.array_records[ARRAYS]
    load_global(model, arrays)
    crash_point("client-train", server_round=server_round)
    mu = proximal_mu(conf)
    control = msg.content.array_records.get(CONTROL)
    scaffold = state = None
    if control is not None:
        if settings.optimizer != "sgd":
            raise ConfigError(
                "train.optimizer",
                settings.optimizer,
                "SCAFFOLD's control-variate update assumes SGD: set train.optimizer = 'sgd'",
            )
        state = ClientState.of(context)
        scaffold = ScaffoldClient.start(
            control,
            arrays,
            state,
            server_round,
            option=scaffold_option(conf),
            weight=scaffold_weight(conf),
        )
    settings = settings.bind(
        model, proximal_mu=mu, correction=scaffold.correction(model) if scaffold else None
    )
    train_fn, _ = resolve_loops(cfg.model)
    loader = make_loader(data.train, batch_size=settings.batch_size, shuffle=True, seed=seed)
    result = call_loop(
        train_fn, (model, loader, settings), key="model.train-fn", spec=cfg.model.train_fn or None
    )
    if mu > 0 and settings.counter.regularized == 0:
        log.warning(
            "FedProx: the train function never called settings.regularize(model, loss); "
            "the proximal term (mu = %g) was not applied",
            mu,
        )
    trained = model_to_arrays(model)
    records: dict[str, Any] = {
        ARRAYS: trained,
        METRICS: MetricRecord({**result, NUM_EXAMPLES: len(data.train)}),
    }
    if scaffold is not None:
        assert state is not None
        records[CONTROL_DELTA] = scaffold.finish(model, trained, settings, state, server_round)
    return Message(RecordDict(records), reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on local validation data."""
    cfg = local_config(context)
    data = local_data(cfg, context.node_config)
    model = _model(cfg, data.val.input_shape, data.val.num_classes)
    arrays: ArrayRecord = msg.content.array_records[ARRAYS]
    load_global(model, arrays)
    _, eval_fn = resolve_loops(cfg.model)
    loader = make_loader(data.val, batch_size=256, shuffle=False)
    result = call_loop(
        eval_fn, (model, loader), key="model.evaluate-fn", spec=cfg.model.evaluate_fn or None
    )
    # The loop's own extra metrics go along as eval_<name> (the server keeps them).
    extra = {
        k if k.startswith("eval_") else f"eval_{k}": v
        for k, v in result.items()
        if k not in ("loss", "accuracy")
    }
    metrics = MetricRecord(
        {
            **extra,
            "eval_loss": result["loss"],
            "eval_acc": result["accuracy"],
            NUM_EXAMPLES: len(data.val),
        }
    )
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)
