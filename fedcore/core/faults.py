"""Named crash points for crash-safety tests (the SQLite-style fault-injection hook).

``crash_point("checkpoint-partial", server_round=3)`` kills the process with
SIGKILL when the environment variable ``FEDCORE_CRASH_AT`` is
``checkpoint-partial:3`` (or ``checkpoint-partial:*``). Unset, as in every normal
run, it is a dictionary lookup and nothing else. Tests use it to crash at points
a timer cannot hit reliably, such as half-way through writing a checkpoint.
"""

from __future__ import annotations

import os
import signal

__all__ = ["crash_point"]

ENV = "FEDCORE_CRASH_AT"


def crash_point(name: str, *, server_round: int) -> None:
    """SIGKILL this process if ``FEDCORE_CRASH_AT`` names this point and round."""
    wanted = os.environ.get(ENV)
    if wanted and wanted in (f"{name}:{server_round}", f"{name}:*"):
        os.kill(os.getpid(), signal.SIGKILL)
