"""Ray Train machinery: the shared per-worker loop, the task objects, checkpoints, history and shared configs."""
