"""Moved to `dsxfer.method.model` in 0.2; this import path is kept for one release (removed in 0.3)."""

from dsxfer.method.model import TransferModel, build_transfer_model, load_trained  # noqa: F401

__all__ = ["TransferModel", "build_transfer_model", "load_trained"]
