"""Moved to `dsxfer.training.train` in 0.2; this import path is kept for one release (removed in 0.3)."""

from dsxfer.training.train import run_training, train  # noqa: F401

__all__ = ["run_training", "train"]
