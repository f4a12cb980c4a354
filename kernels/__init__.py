"""dsxfer.kernels: functional API for the fused kernels, with dispatch.

CUDA tensors with Triton available -> the Triton kernels; anything else -> PyTorch: prefix attention
through the fused `scaled_dot_product_attention` (`sdpa.py`, the CPU path), the alignment loss through
the reference. `reference.py` is the test oracle: plain matmul and softmax, in float64 when asked.
Callers never import a backend directly.

DSXFER_KERNELS=auto|sdpa|reference|triton (default auto) forces a backend: `triton` on CPU tensors runs
the kernels in Triton's interpreter (how the tests exercise them without a GPU). Calls the Triton kernels
do not cover go to SDPA whatever the switch says (prefix attention with a general `attn_mask`, or float64
/ head dim > 256), and the alignment loss in float64 (the oracle dtype) to the reference.
"""

from __future__ import annotations

import importlib
import os

import torch

from dsxfer.kernels import reference, sdpa
from dsxfer.kernels.reference import masked_mean_pool

# The Triton modules share their names with the functions below. They are imported here, before the
# functions are defined, so that the package attributes `prefix_attention` / `alignment_loss` end up as
# the functions: a submodule binds itself onto the package only when it is first loaded.
try:
    _triton_attention = importlib.import_module("dsxfer.kernels.prefix_attention")
    _triton_alignment = importlib.import_module("dsxfer.kernels.alignment_loss")
except ImportError:  # no Triton on this platform: the reference is the only backend
    _triton_attention = _triton_alignment = None

__all__ = ["alignment_loss", "prefix_attention", "masked_mean_pool", "reference", "backend"]

BACKENDS = ("auto", "sdpa", "reference", "triton")


def backend(device) -> str:
    """'triton', 'sdpa' or 'reference' for tensors on `device`, after the DSXFER_KERNELS switch."""
    choice = os.environ.get("DSXFER_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        from dsxfer.errors import ConfigError

        raise ConfigError(f"environment variable DSXFER_KERNELS={choice!r} is invalid: expected one of "
                          f"{', '.join(BACKENDS)}")
    if choice in ("reference", "sdpa"):
        return choice
    if _triton_attention is None:
        return "sdpa"
    if choice == "triton":
        return "triton"
    return "triton" if getattr(device, "type", str(device)) == "cuda" else "sdpa"


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False,
                     scale=None, attn_mask=None, dropout_p=0.0):
    """Attention over [prefix K/V ; sequence K/V]; see `reference.prefix_attention` for shapes. dropout_p > 0
    (attention-probability dropout, training only) always runs through torch's SDPA, which implements it."""
    if dropout_p > 0:
        return sdpa.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, attn_mask, dropout_p)
    choice = backend(q.device)
    if choice == "triton" and _triton_attention.supports(q, k, attn_mask):
        return _triton_attention.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
    if choice == "reference":
        return reference.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, attn_mask)
    return sdpa.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, attn_mask)


def alignment_loss(hidden, mask, teacher, loss="cosine", temperature=0.05):
    """Pooled alignment loss; see `reference.alignment_loss` for the definitions."""
    if backend(hidden.device) == "triton" and hidden.dtype != torch.float64:
        return _triton_alignment.alignment_loss(hidden, mask, teacher, loss, temperature)
    return reference.alignment_loss(hidden, mask, teacher, loss, temperature)
