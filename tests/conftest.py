"""Shared fixtures (the models and data they build come from tests/tiny.py).

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
    from dsxfer.method.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_path):
    """The fast tokenizer of the embedded default model, loaded the way dsxfer loads it."""
    from dsxfer.method.backbone import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny XLM-R folder (weights + fast tokenizer) that configs name as model.name_or_path.
    Six layers, so a config's top-4-layer injection leaves layers below it without prefixes."""
    from tiny import save_tiny_folder, tiny_backbone_and_tokenizer

    return save_tiny_folder(tmp_path_factory.mktemp("tiny-xlmr"), *tiny_backbone_and_tokenizer("xlm-roberta", num_hidden_layers=6))


@pytest.fixture(scope="module")
def tiny_xlmr(tmp_path_factory):
    """A saved tiny XLM-R (2 layers, 2 heads) with the XQuAD-trained subword tokenizer (tiny.encoder_tokenizer)."""
    from tiny import save_tiny_folder, subword_backbone

    return save_tiny_folder(tmp_path_factory.mktemp("xlmr"), *subword_backbone("xlm-roberta"))
