"""Local training and evaluation loops, and the hooks for users' own.

A custom loop is any function with one of these signatures, named by import
path in ``model.train-fn`` / ``model.evaluate-fn``::

    def train(model: nn.Module, loader: DataLoader, settings: TrainSettings) -> dict[str, float]
    def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]

``train`` must return at least ``"train_loss"``; ``evaluate`` at least ``"loss"``
and ``"accuracy"``. Both get the model already loaded with the global weights and
must leave the trained weights in it. No fedcore base class is involved.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .config import ModelConfig, TrainConfig
from .data import Dataset
from .errors import ModelError
from .registry import import_object

__all__ = [
    "TrainSettings",
    "evaluate",
    "make_loader",
    "resolve_loops",
    "train",
]


@dataclass(frozen=True)
class TrainSettings:
    """What one local training call needs; ``seed`` drives shuffling and dropout."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, seed: int) -> TrainSettings:
        """Settings from the ``[train]`` section plus a per-(round, client) seed."""
        return cls(
            epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            optimizer=cfg.optimizer,
            seed=seed,
        )


def make_loader(data: Dataset, *, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process ``DataLoader`` over in-memory tensors, shuffled by ``seed``."""
    ds = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


def train(model: nn.Module, loader: DataLoader, settings: TrainSettings) -> dict[str, float]:
    """Train in place with SGD (momentum) or Adam on cross-entropy.

    Returns ``{"train_loss": mean loss over all batches of the last epoch}``.
    """
    torch.manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if settings.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, count = 0.0, 0
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
    return {"train_loss": total / max(count, 1)}


def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """Mean cross-entropy and accuracy over ``loader``."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for xb, yb in loader:
            out = model(xb)
            total_loss += float(loss_fn(out, yb))
            correct += int((out.argmax(dim=1) == yb).sum())
            count += len(yb)
    if count == 0:
        return {"loss": 0.0, "accuracy": 0.0}
    return {"loss": total_loss / count, "accuracy": correct / count}


TrainFn = Callable[[nn.Module, DataLoader, TrainSettings], Mapping[str, float]]
EvaluateFn = Callable[[nn.Module, DataLoader], Mapping[str, float]]


def resolve_loops(cfg: ModelConfig) -> tuple[TrainFn, EvaluateFn]:
    """The configured custom loops, or the built-in :func:`train` / :func:`evaluate`."""
    train_fn: TrainFn = import_object(cfg.train_fn, key="model.train-fn") if cfg.train_fn else train
    eval_fn: EvaluateFn = (
        import_object(cfg.evaluate_fn, key="model.evaluate-fn") if cfg.evaluate_fn else evaluate
    )
    return train_fn, eval_fn


def checked_metrics(result: Any, required: tuple[str, ...], fn_name: str) -> dict[str, float]:
    """Validate what a (possibly user) loop returned: a mapping with finite numbers."""
    if not isinstance(result, Mapping):
        raise ModelError(f"{fn_name} returned {type(result).__name__}; it must return a dict")
    missing = [k for k in required if k not in result]
    if missing:
        raise ModelError(f"{fn_name} returned keys {sorted(result)}; missing {missing}")
    out: dict[str, float] = {}
    for k, v in result.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise ModelError(
                f"{fn_name} returned {k}={v!r}; metric values must be numbers"
            ) from None
    return out
