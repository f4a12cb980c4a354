"""Training: the DeepSpeed engine, the run folder, checkpoints, and the training loop."""
