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

from fedcore.clientside.data import Dataset
from fedcore.core.config import ModelConfig, TrainConfig
from fedcore.core.errors import ModelError
from fedcore.core.registry import import_object

__all__ = [
    "TrainSettings",
    "evaluate",
    "make_loader",
    "resolve_loops",
    "seed_torch",
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


def seed_torch(seed: int) -> None:
    """Seed torch's CPU generator (dropout, random init) for one training call.

    ``torch.manual_seed`` also queues lazy seeding of every accelerator backend,
    formatting a Python stack trace for each (about 1 ms per call, measured per
    client per round); CUDA is seeded only if this process already uses it.
    """
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


class _SGD:
    """``torch.optim.SGD``'s update (its single-tensor CPU path, no dampening or Nesterov).

    The built-in loop does not use ``torch.optim``: an optimizer's first use
    imports ``torch._dynamo`` (about 1.7 s and 70 MB in every process that trains,
    i.e. every simulation worker). The updates are the same tensor operations in
    the same order, so the trained weights are bit-identical
    (``tests/test_engine_perf.py`` compares them with ``torch.optim``).
    """

    def __init__(
        self, params: list[nn.Parameter], *, lr: float, momentum: float, weight_decay: float
    ) -> None:
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1)
                grad = buf
            p.add_(grad, alpha=-self.lr)


class _Adam:
    """``torch.optim.Adam``'s update (single-tensor CPU path, default hyperparameters).

    Betas 0.9/0.999, eps 1e-8, L2 weight decay, no AMSGrad; see :class:`_SGD` for
    why not ``torch.optim``.
    """

    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def __init__(self, params: list[nn.Parameter], *, lr: float, weight_decay: float) -> None:
        self.params, self.lr, self.weight_decay = params, lr, weight_decay
        self.state: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(params)
        self.steps = [0] * len(params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.beta1, self.beta2
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            state = self.state[i]
            if state is None:
                state = self.state[i] = (
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                    torch.zeros_like(p, memory_format=torch.preserve_format),
                )
            exp_avg, exp_avg_sq = state
            self.steps[i] += 1
            step = float(self.steps[i])
            grad = p.grad
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = self.lr / bias_correction1
            denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)


def train(model: nn.Module, loader: DataLoader, settings: TrainSettings) -> dict[str, float]:
    """Train in place with SGD (momentum) or Adam on cross-entropy.

    Returns ``{"train_loss": mean loss over all batches of the last epoch}``.
    """
    seed_torch(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt: _SGD | _Adam
    if settings.optimizer == "adam":
        opt = _Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        opt = _SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    total, count = 0.0, 0
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            opt.zero_grad()
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
