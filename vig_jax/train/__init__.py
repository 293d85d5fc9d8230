"""Training system: optimizer, sharded train step, loop, checkpoints, metrics."""
