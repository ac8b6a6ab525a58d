"""The fedcore ServerApp: one Flower ``ServerApp`` for every engine.

Runs unchanged under fedcore's embedded engine (``fedcore simulate``), Flower's
simulation engine (``flwr run .``) and Flower's deployment engine.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcore.runtime.serve import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Read the run config, run every round, write the run directory."""
    serve(grid, context)
