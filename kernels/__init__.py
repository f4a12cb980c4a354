"""dsxfer.kernels: functional API for the fused kernels, with dispatch.

CUDA tensors with Triton available -> the Triton kernels; anything else -> the PyTorch reference
in `reference.py` (the CPU path and the test oracle). Callers never import a backend directly.
"""

from __future__ import annotations

from dsxfer.kernels import reference
from dsxfer.kernels.reference import masked_mean_pool

__all__ = ["alignment_loss", "prefix_attention", "masked_mean_pool", "reference"]


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, key_padding_mask=None, causal=False,
                     scale=None, attn_mask=None):
    """Attention over [prefix K/V ; sequence K/V]; see `reference.prefix_attention` for shapes."""
    return reference.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, attn_mask)


def alignment_loss(hidden, mask, teacher, loss="cosine", temperature=0.05):
    """Pooled alignment loss; see `reference.alignment_loss` for the definitions."""
    return reference.alignment_loss(hidden, mask, teacher, loss, temperature)
