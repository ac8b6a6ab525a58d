"""Server side: the round loop, exchanges, strategies, checkpoints and the run directory."""
