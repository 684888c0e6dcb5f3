"""The training loop: optimiser, schedule, checkpoints, resume. Knows nothing of methods."""
