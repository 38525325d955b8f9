"""Running: the run configuration, the backends (simulation, in-process, serial), checkpoints, metrics."""
