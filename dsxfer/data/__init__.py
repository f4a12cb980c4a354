"""Data: readers, task registry, featurization, k-shot sampling."""
