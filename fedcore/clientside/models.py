"""Built-in models and the factory that builds any user ``nn.Module`` from config.

fedcore never asks for a base class: a model factory is any callable returning a
``torch.nn.Module`` whose output for a batch of ``B`` inputs has shape
``(B, num_classes)``. Built-ins are registered by name::

    >>> from fedcore.core.config import ModelConfig
    >>> model = build_model(ModelConfig(factory="mlp"), input_shape=(1, 8, 8), num_classes=10)
    >>> type(model).__name__
    'Sequential'
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedcore.core.config import ModelConfig
from fedcore.core.errors import ConfigError
from fedcore.core.registry import Registry, resolve_callable

__all__ = ["MODELS", "build_model", "cnn", "mlp"]

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def mlp(
    *, input_shape: Sequence[int], num_classes: int, hidden: int = 128, depth: int = 2
) -> nn.Module:
    """Multi-layer perceptron on flattened inputs: ``depth`` hidden ReLU layers."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(*, input_shape: Sequence[int], num_classes: int, channels: int = 32) -> nn.Module:
    """Small CNN for ``(C, H, W)`` images: two 3x3 convs, one 2x2 pool, two dense layers."""
    if len(input_shape) != 3:
        raise ConfigError(
            "model.factory",
            "cnn",
            f"'cnn' needs image inputs (channels, height, width) but the data's examples have "
            f"shape {tuple(input_shape)}; use factory = 'mlp' for flat features",
        )
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * (h // 2) * (w // 2), 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


MODELS.register("mlp", mlp)
MODELS.register("cnn", cnn)


def _call_factory(
    factory: Callable[..., Any],
    kwargs: dict[str, Any],
    input_shape: tuple[int, ...],
    num_classes: int,
) -> Any:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if ("input_shape" in params or accepts_any) and "input_shape" not in kwargs:
        kwargs["input_shape"] = input_shape
    if ("num_classes" in params or accepts_any) and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    return factory(**kwargs)


def build_model(
    cfg: ModelConfig, *, input_shape: Sequence[int], num_classes: int, check: bool = True
) -> nn.Module:
    """Build the configured model and check it maps one example to ``num_classes`` logits.

    Raises
    ------
    ConfigError
        The factory name or import path is wrong, its keyword arguments do not fit,
        it does not return an ``nn.Module``, or the output shape is wrong.

    """
    factory = resolve_callable(cfg.factory, MODELS, key="model.factory")
    shape = tuple(int(d) for d in input_shape)
    try:
        model = _call_factory(factory, dict(cfg.kwargs), shape, num_classes)
    except TypeError as exc:
        raise ConfigError(
            "model.kwargs", dict(cfg.kwargs), f"do not fit factory '{cfg.factory}': {exc}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            "model.factory",
            cfg.factory,
            f"returned a {type(model).__name__}; a factory must return a torch.nn.Module",
        )
    if check:
        check_output(model, cfg.factory, shape, num_classes)
    return model


def check_output(
    model: nn.Module, name: str, input_shape: tuple[int, ...], num_classes: int
) -> None:
    """Run two dummy examples through ``model``; its output must be ``(2, num_classes)``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *input_shape)))
    except Exception as exc:  # noqa: BLE001 - report any forward failure as a model error
        raise ConfigError(
            "model.factory",
            name,
            f"the model's forward pass fails on a batch of shape (2, "
            f"{', '.join(map(str, input_shape))}): {type(exc).__name__}: {exc}",
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            "model.factory",
            name,
            f"the model outputs shape {found} for a batch of 2, but the data has "
            f"{num_classes} classes: the output must be (batch, {num_classes}) logits",
        )
