"""A deployment client's checks of its data against the model, before joining and per model.

``fedcore client`` checks before it connects that its data file loads with its own
config (labels fit ``data.num-classes``) and that the model it builds for the data's
shape maps a dummy batch to one logit per class
(:func:`fedcore.clientside.handlers.prepare`), then runs :func:`check_message` on every
message that carries the server's model, before the
ClientApp sees it: a server model whose arrays do not fit the model this client
built for its data (a file with 64 features for a 30-feature model) raises
:class:`ModelMismatch` naming the file, its shape, what the server's model expects
and the fix, instead of a traceback from ``load_state_dict`` in every round.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from flwr.app import Context, Message

from fedcore.core.config import Config
from fedcore.core.errors import DataError
from fedcore.core.records import ARRAYS

__all__ = ["ModelMismatch", "check_message", "mismatch"]


class ModelMismatch(DataError):
    """The server's model does not fit this client's data (shapes or classes)."""


@functools.lru_cache(maxsize=8)
def _local_shapes(
    cfg: Config, input_shape: tuple[int, ...], num_classes: int
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from fedcore.clientside.models import build_model

    model = build_model(cfg.model, input_shape=input_shape, num_classes=num_classes)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def check_message(message: Message, context: Context) -> None:
    """Raise :class:`ModelMismatch` if the message's model does not fit this client's data.

    Messages without the model (``arrays``), e.g. the key stages of secure
    aggregation, pass unchecked.
    """
    arrays = message.content.array_records.get(ARRAYS)
    if arrays is None:
        return
    from fedcore.clientside.handlers import DATA_PATH, local_data
    from fedcore.clientside.policy import local_config

    cfg = local_config(context)
    data = local_data(cfg, context.node_config).train
    local = dict(_local_shapes(cfg, data.input_shape, data.num_classes))
    server = {name: tuple(int(d) for d in a.shape) for name, a in arrays.items()}
    problem = mismatch(server, local, input_shape=data.input_shape, num_classes=data.num_classes)
    if problem:
        source = context.node_config.get(DATA_PATH, "this client's data")
        raise ModelMismatch(
            f"this client's data does not fit the server's model: {problem}; data file "
            f"{source}: {len(data)} training example(s) of shape {data.input_shape}, "
            f"{data.num_classes} class(es) (model {cfg.model.factory!r} from this client's "
            "own config). Fix: give this client a data file with the federation's features "
            "and classes, or the model config the server uses; refusing to train"
        )


def mismatch(
    server: Mapping[str, tuple[int, ...]],
    local: Mapping[str, tuple[int, ...]],
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
) -> str:
    """Why the server's array shapes do not fit the local model's ('' when they do).

    Names the first array that differs and, for a model's first layer or its
    output layer, what the server's model expects of the data::

        >>> server = {"0.weight": (16, 30), "0.bias": (16,)}
        >>> here = {"0.weight": (16, 64), "0.bias": (16,)}
        >>> why = mismatch(server, here, input_shape=(64,), num_classes=2)
        >>> for part in why.split(", this"):
        ...     print(part)
        the server's model takes 30 input feature(s) (or channels) per example
         data has 64 (array '0.weight' is [16, 30] there, [16, 64] here)
    """
    if set(server) != set(local):
        extra, missing = sorted(set(server) - set(local)), sorted(set(local) - set(server))
        return (
            f"its arrays differ from this client's model (only in the server's: {extra[:5]}; "
            f"only here: {missing[:5]}): a different model architecture"
        )
    names = list(local)
    for i, name in enumerate(names):
        s, here = server[name], local[name]
        if s == here:
            continue
        text = f"array '{name}' is {list(s)} there, {list(here)} here"
        if i == 0 and len(s) >= 2 and len(s) == len(here) and s[1] != here[1]:
            return (
                f"the server's model takes {s[1]} input feature(s) (or channels) per example, "
                f"this data has {here[1]} ({text})"
            )
        if i >= len(names) - 2 and s and len(s) == len(here) and here[0] == num_classes:
            return (
                f"the server's model has {s[0]} output class(es), this client's data has "
                f"{num_classes} (data.num-classes, or the largest label + 1; {text})"
            )
        return f"a different input shape or model architecture ({text})"
    return ""
