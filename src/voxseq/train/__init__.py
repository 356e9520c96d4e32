"""Training infrastructure shared by every task: checkpoints, optimisers, distributed, metrics, plots."""
