"""Training: the loop, optimiser groups and schedules, checkpoints with exact resume, run folders."""
