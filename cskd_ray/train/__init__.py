"""Ray Train stages: the shared per-worker loop, checkpoints, and the alignment stage."""
