"""User loops that break the train/evaluate contract (copied next to a test's config).

The error texts are built at run time, so a traceback's source lines do not repeat
them: a test can count how often the server shows each.
"""

from torch import nn

CODE = 4242


def make_model(input_shape, num_classes):
    """A linear model for digits (8x8 images)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


def _step(code):
    raise ValueError(f"loop exploded with code {code}")


def raising_train(model, loader, settings):
    """Raises from a helper two frames down."""
    return _step(CODE)


def two_argument_train(model, loader):
    """Forgot ``settings``."""
    return {"train_loss": 0.0}


def list_train(model, loader, settings):
    """Returns a list, not a dict."""
    return [0.5]


def lossless_train(model, loader, settings):
    """Returns a dict without ``train_loss``."""
    return {"loss": 0.5}


def nan_train(model, loader, settings):
    """Returns a non-finite loss."""
    return {"train_loss": float("nan")}


def raising_evaluate(model, loader):
    """Raises in every federated evaluation."""
    return _step(CODE + 1)
