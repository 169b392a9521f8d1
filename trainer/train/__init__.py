"""The training runtime: loop, checkpoints, samples, metrics, progress and exports."""
