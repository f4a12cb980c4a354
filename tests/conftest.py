"""Shared fixtures.

`embedded_path` builds the embedded default model into the default cache ($DSXFER_CACHE, else
~/.cache/dsxfer) once and re-uses it on later runs, so only the first test run pays the conversion.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def embedded_path():
    """The validated HF folder of the embedded default model (multilingual-e5-small)."""
    from dsxfer.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_path):
    """The fast tokenizer of the embedded default model, loaded the way dsxfer loads it."""
    from dsxfer.backbone import load_tokenizer

    return load_tokenizer(None)
