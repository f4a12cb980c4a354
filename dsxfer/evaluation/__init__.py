"""Evaluation: official-equivalent metrics, per-language prediction and scoring, reports."""
