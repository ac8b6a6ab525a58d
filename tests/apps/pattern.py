"""A trainable MLP whose first layer starts as a distinctive float pattern (wire-capture tests)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def pattern(n: int) -> np.ndarray:
    """``n`` float32 values unlikely to occur by chance: 0.05 * sin(0.7071 k + 0.123)."""
    k = np.arange(n, dtype=np.float64)
    return (0.05 * np.sin(0.7071 * k + 0.123)).astype(np.float32)


def needle() -> bytes:
    """The first 16 weights of the first layer as raw little-endian float32 (64 bytes)."""
    return pattern(16).astype("<f4").tobytes()


def model(input_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> nn.Module:
    """Flatten -> Linear(hidden) -> ReLU -> Linear(num_classes), first layer = the pattern."""
    m = nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    with torch.no_grad():
        w = m[1].weight
        w.copy_(torch.from_numpy(pattern(w.numel())).reshape(w.shape))
    return m
