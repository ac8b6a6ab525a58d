"""A train function that leaves a mark: it proves (or disproves) that a config's loop ran.

``train`` appends a line to the file named by ``FEDCORE_TEST_MARKER_FILE`` and then runs
fedcore's built-in loop, so a run that uses it still trains.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedcore.clientside.training import train as builtin_train

MARKER_ENV = "FEDCORE_TEST_MARKER_FILE"


def train(model, loader, settings):
    """Mark the file, then train as the built-in loop does."""
    with Path(os.environ[MARKER_ENV]).open("a") as f:
        f.write(f"train-fn ran in pid {os.getpid()}\n")
    return builtin_train(model, loader, settings)
