"""Shared fixtures.

`embedded_path` builds the embedded default model into the default cache ($DSXFER_CACHE, else
~/.cache/dsxfer) once and re-uses it on later runs, so only the first test run pays the conversion.
"""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run on CPU tensors only in Triton's interpreter, and Triton picks interpreter or compiler
# once, when it is first imported (its own tl.sum, tl.max... are decorated then). Switch it on here,
# before any test module imports triton, on machines without a GPU; GPU machines keep the compiler for
# the gpu-marked kernel tests. tests/test_kernels_compile.py compiles in a subprocess without it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
