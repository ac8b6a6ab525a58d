"""Model factories that config validation must refuse."""

from torch import nn


def wrong_classes() -> nn.Module:
    """Outputs 3 logits whatever the data has (digits has 10 classes)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
