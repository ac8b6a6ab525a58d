"""Local training and evaluation loops, and the hooks for users' own.

A custom loop is any function with one of these signatures, named by import
path in ``model.train-fn`` / ``model.evaluate-fn``::

    def train(model: nn.Module, loader: DataLoader, settings: TrainSettings) -> dict[str, float]
    def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]

``train`` must return at least ``"train_loss"``; ``evaluate`` at least ``"loss"``
and ``"accuracy"``. Both get the model already loaded with the global weights and
must leave the trained weights in it. No fedcore base class is involved.

Strategies that change local training reach a user's loop through ``settings``;
a loop that calls both hooks works with every strategy::

    for xb, yb in loader:
        opt.zero_grad()
        loss = settings.regularize(model, loss_fn(model(xb), yb))  # FedProx's term
        loss.backward()
        settings.correct(model)                                    # SCAFFOLD's c - c_i
        opt.step()

Both are no-ops unless the strategy asked for them (``proximal-mu`` > 0, a
SCAFFOLD control variate); ``correct`` also counts the local steps SCAFFOLD needs.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sysconfig
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcore.clientside.data import Dataset
from fedcore.core.config import ModelConfig, TrainConfig
from fedcore.core.errors import ModelError, UserCodeError
from fedcore.core.registry import import_object

__all__ = [
    "StepCounter",
    "TrainSettings",
    "call_loop",
    "checked_metrics",
    "control_variate_update",
    "describe",
    "evaluate",
    "make_loader",
    "resolve_loops",
    "seed_torch",
    "step_size_sum",
    "train",
    "user_traceback",
]


@dataclass
class StepCounter:
    """How often a train call used the strategy hooks (mutable, one per call)."""

    steps: int = 0  # calls of TrainSettings.correct: SCAFFOLD's K
    regularized: int = 0  # calls of TrainSettings.regularize
    #: The raw gradient of the first step (at the global model), by parameter name, when
    #: a SCAFFOLD correction is set: its option I control variate.
    first_gradient: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class TrainSettings:
    """What one local training call needs; ``seed`` drives shuffling and dropout.

    The last four fields carry what a strategy adds to local training; the handler
    fills them (:meth:`bind`) and a loop reaches them through :meth:`regularize`
    and :meth:`correct`.

    Parameters
    ----------
    proximal_mu : float (default: 0.0)
        FedProx's ``mu`` (Li et al. 2020): :meth:`regularize` adds
        ``mu / 2 * ||w - w_global||^2``.
    global_params : mapping of str to Tensor, optional
        The global values of the trainable parameters, by ``named_parameters`` name.
    correction : mapping of str to Tensor, optional
        SCAFFOLD's ``c - c_i`` per trainable parameter (Karimireddy et al. 2020):
        :meth:`correct` adds it to each gradient.
    counter : StepCounter
        Counts :meth:`correct` calls (the local steps ``K``) and :meth:`regularize` calls.

    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    seed: int = 0
    proximal_mu: float = 0.0
    global_params: Mapping[str, torch.Tensor] | None = field(
        default=None, repr=False, compare=False
    )
    correction: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    counter: StepCounter = field(default_factory=StepCounter, repr=False, compare=False)

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

    def bind(
        self,
        model: nn.Module,
        *,
        proximal_mu: float = 0.0,
        correction: Mapping[str, torch.Tensor] | None = None,
    ) -> TrainSettings:
        """A copy for training ``model`` (loaded with the global weights) with the hooks set.

        Snapshots the global trainable parameters when ``proximal_mu`` > 0; starts a
        fresh step counter.
        """
        snapshot = None
        if proximal_mu > 0:
            snapshot = {
                name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad
            }
        return dataclasses.replace(
            self,
            proximal_mu=float(proximal_mu),
            global_params=snapshot,
            correction=correction,
            counter=StepCounter(),
        )

    @property
    def local_steps(self) -> int:
        """How many times :meth:`correct` was called (SCAFFOLD's ``K``)."""
        return self.counter.steps

    def regularize(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """``loss + mu / 2 * sum ||w - w_global||^2`` (FedProx); ``loss`` when ``mu = 0``.

        Call it on each batch's loss before ``backward()``.
        """
        self.counter.regularized += 1
        if self.proximal_mu == 0.0 or not self.global_params:
            return loss
        term = loss.new_zeros(())
        for name, p in model.named_parameters():
            g = self.global_params.get(name)
            if g is not None:
                term = term + (p - g).pow(2).sum()
        return loss + 0.5 * self.proximal_mu * term

    @torch.no_grad()
    def correct(self, model: nn.Module) -> None:
        """Add SCAFFOLD's ``c - c_i`` to each parameter's gradient; count the step.

        Call it once per optimizer step, after ``backward()`` and before ``step()``.
        The first call also keeps the uncorrected gradient: taken at the global model,
        it is SCAFFOLD's option I estimate of ``c_i``.
        """
        self.counter.steps += 1
        if self.correction is None:
            return
        first = self.counter.steps == 1
        if first:
            self.counter.first_gradient = {}
        for name, p in model.named_parameters():
            corr = self.correction.get(name)
            if corr is None:
                continue
            if first:
                raw = p.grad if p.grad is not None else torch.zeros_like(p)
                self.counter.first_gradient[name] = raw.detach().cpu().numpy().astype(np.float64)
            if p.grad is not None:
                p.grad.add_(corr)


def step_size_sum(lr: float, momentum: float, steps: int) -> float:
    """Total step size of ``steps`` SGD steps on a constant gradient: ``x - y = S * g``.

    ``steps * lr`` without momentum (the paper's ``K * eta_l``); with heavy-ball
    momentum ``beta`` (buffer started at the first gradient, as in :class:`_SGD` and
    ``torch.optim.SGD``) ``lr * sum_{j=1..K} (1 - beta^j) / (1 - beta)``.

    >>> step_size_sum(0.1, 0.0, 10)
    1.0
    >>> round(step_size_sum(0.1, 0.5, 2), 6)    # 0.1 * (1 + 1.5)
    0.25
    """
    if momentum == 0.0:
        return steps * lr
    geometric = momentum * (1.0 - momentum**steps) / (1.0 - momentum)
    return lr * (steps - geometric) / (1.0 - momentum)


def control_variate_update(
    c: Mapping[str, np.ndarray],
    c_i: Mapping[str, np.ndarray],
    x: Mapping[str, np.ndarray],
    y: Mapping[str, np.ndarray],
    *,
    step_sum: float,
    names: set[str] | None = None,
    weight: float = 1.0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """SCAFFOLD option II: ``c_i+ = c_i - c + (x - y) / step_sum``; returns ``(c_i+, c_i+ - c_i)``.

    Karimireddy et al. 2020, Algorithm 1 line 12, with ``step_sum = K * lr`` for plain
    SGD (:func:`step_size_sum` for momentum). With the local gradients corrected by
    ``weight * (c - c_i)`` instead of ``c - c_i``, ``(x - y) / step_sum`` also carries
    ``weight`` times the correction, so ``c_i+ = weight * (c_i - c) + (x - y) / step_sum``
    (the paper's formula at ``weight = 1``): the mean uncorrected gradient. Arrays not
    in ``names`` (buffers, not trained by gradients) keep ``c_i``. float64 throughout.

    >>> one = {"w": np.array([1.0])}
    >>> new, delta = control_variate_update(
    ...     {"w": np.array([0.5])}, {"w": np.array([0.0])}, {"w": np.array([2.0])}, one,
    ...     step_sum=0.5)
    >>> new["w"].tolist(), delta["w"].tolist()    # 0 - 0.5 + (2 - 1) / 0.5
    ([1.5], [1.5])
    """
    if not (step_sum > 0 and np.isfinite(step_sum)):
        raise ValueError(f"step_sum must be a positive number, got {step_sum!r}")
    new: dict[str, np.ndarray] = {}
    delta: dict[str, np.ndarray] = {}
    for name, ci in c_i.items():
        ci = np.asarray(ci, dtype=np.float64)
        if names is not None and name not in names:
            new[name], delta[name] = ci, np.zeros_like(ci)
            continue
        drift = np.asarray(x[name], np.float64) - np.asarray(y[name], np.float64)
        new[name] = weight * (ci - np.asarray(c[name], np.float64)) + drift / step_sum
        delta[name] = new[name] - ci
    return new, delta


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

    Applies the strategy hooks (:meth:`TrainSettings.regularize`, :meth:`TrainSettings.correct`)
    at every step. Returns ``{"train_loss": mean loss over all batches of the last epoch}``
    (the cross-entropy, without the proximal term).
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
            settings.regularize(model, loss).backward()
            settings.correct(model)
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

#: What each loop is called with and must return (the error messages quote it).
TRAIN_CONTRACT = (
    "a train function is called as fn(model, loader, settings) and must return a dict of "
    "finite numbers with at least 'train_loss', e.g. {'train_loss': 0.42} (extra numeric "
    "keys are returned to the server as metrics)"
)
EVALUATE_CONTRACT = (
    "an evaluate function is called as fn(model, loader) and must return a dict of finite "
    "numbers with at least 'loss' and 'accuracy', e.g. {'loss': 0.3, 'accuracy': 0.9}"
)
_CONTRACTS = {
    "model.train-fn": (3, ("train_loss",), TRAIN_CONTRACT),
    "model.evaluate-fn": (2, ("loss", "accuracy"), EVALUATE_CONTRACT),
}


def resolve_loops(cfg: ModelConfig) -> tuple[TrainFn, EvaluateFn]:
    """The configured custom loops, or the built-in :func:`train` / :func:`evaluate`.

    A custom loop that cannot be called with its arguments (``(model, loader,
    settings)``, ``(model, loader)``) is refused here, before any client trains.
    """
    train_fn: TrainFn = train
    eval_fn: EvaluateFn = evaluate
    if cfg.train_fn:
        train_fn = import_object(cfg.train_fn, key="model.train-fn")
        _check_signature(train_fn, "model.train-fn", cfg.train_fn)
    if cfg.evaluate_fn:
        eval_fn = import_object(cfg.evaluate_fn, key="model.evaluate-fn")
        _check_signature(eval_fn, "model.evaluate-fn", cfg.evaluate_fn)
    return train_fn, eval_fn


def describe(fn: Any, spec: str) -> str:
    """``'mod:fn' (/path/to/mod.py:12)``: a user's function and where it is defined."""
    target = inspect.unwrap(fn)
    try:
        file = inspect.getsourcefile(target) or inspect.getfile(target)
    except TypeError:
        file = None
    code = getattr(target, "__code__", None)
    line = f":{code.co_firstlineno}" if code is not None else ""
    return f"'{spec}' ({file}{line})" if file else f"'{spec}'"


def _check_signature(fn: Any, key: str, spec: str) -> None:
    n, _, contract = _CONTRACTS[key]
    if not callable(fn):
        raise UserCodeError(
            key, f"'{spec}'", f"is a {type(fn).__name__}, not a function; {contract}"
        )
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return
    try:
        sig.bind(*range(n))
    except TypeError as exc:
        raise UserCodeError(
            key,
            describe(fn, spec),
            f"has the signature {sig}, which cannot take {n} "
            f"positional arguments ({exc}); {contract}",
        ) from None


_LIBRARY_DIRS = tuple(
    str(Path(p).resolve())
    for p in {
        Path(__file__).resolve().parents[1],  # fedcore
        Path(sysconfig.get_paths()["stdlib"]),
        Path(sysconfig.get_paths()["purelib"]),
        Path(sysconfig.get_paths()["platlib"]),
    }
)


def _library_frame(filename: str) -> bool:
    if filename.startswith("<"):
        return True
    path = str(Path(filename).resolve())
    return path.startswith(_LIBRARY_DIRS) or "site-packages" in path


def user_traceback(exc: BaseException) -> tuple[str, str]:
    """``(location, text)`` of the user's own frames of ``exc``'s traceback.

    fedcore, Flower, torch and standard-library frames are left out (unless no
    other frame is left: then the last three); ``location`` is the innermost user
    frame, ``"file:line, in function"``. The exception's own line is not repeated.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if not _library_frame(f.filename)] or frames[-3:]
    if not own:
        return "", ""
    last = own[-1]
    text = "Traceback (your frames, most recent call last):\n" + "".join(traceback.format_list(own))
    return f"{last.filename}:{last.lineno}, in {last.name}", text.rstrip("\n")


def call_loop(fn: Any, args: tuple[Any, ...], *, key: str, spec: str | None) -> dict[str, float]:
    """Call a train/evaluate loop and check what it returned.

    ``spec`` is the user's import path (``model.train-fn``'s value) or ``None`` for the
    built-in loop. A user's loop that raises, or returns something outside its
    contract, raises :class:`~fedcore.core.errors.UserCodeError` naming ``key``, the
    function and its file, with the user's frames of the traceback.
    """
    _, required, contract = _CONTRACTS[key]
    if spec is None:
        return checked_metrics(fn(*args), required, key)
    where = describe(fn, spec)
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - the user's code: re-raised with its location
        location, text = user_traceback(exc)
        message = str(exc).strip().splitlines()
        what = f"raised {type(exc).__name__}" + (f": {message[0]}" if message else "")
        if location:
            what += f" (at {location})"
        raise UserCodeError(key, where, what, text) from None
    try:
        return checked_metrics(result, required, key, finite=True)
    except ModelError as exc:
        raise UserCodeError(key, where, f"{exc}; {contract}") from None


def checked_metrics(
    result: Any, required: tuple[str, ...], fn_name: str, *, finite: bool = False
) -> dict[str, float]:
    """Validate what a (possibly user) loop returned: a mapping of numbers (``finite``: finite)."""
    if not isinstance(result, Mapping):
        raise ModelError(f"{fn_name} returned {type(result).__name__}; it must return a dict")
    missing = [k for k in required if k not in result]
    if missing:
        raise ModelError(f"{fn_name} returned keys {sorted(map(str, result))}; missing {missing}")
    out: dict[str, float] = {}
    for k, v in result.items():
        try:
            if isinstance(v, str | bytes):
                raise TypeError
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise ModelError(
                f"{fn_name} returned {k}={v!r}; metric values must be numbers"
            ) from None
        if finite and not math.isfinite(out[str(k)]):
            raise ModelError(f"{fn_name} returned {k}={v!r}; metric values must be finite")
    return out
