"""Prefix attention through PyTorch's fused `scaled_dot_product_attention`: the CPU path.

The reference (`reference.py`) materialises the scores and the softmax in float32 — the test oracle,
3-10x slower on a CPU than the fused kernel at the embedded model's shapes (12 heads of 32, windows of
128-256: bench/profile_step.py). This backend gives the reference's answer through SDPA: the prefix
keys/values are concatenated in front of the sequence ones, and the mask is only built when one is
needed (key padding, causality with a prefix, a general `attn_mask`).

One difference is handled here rather than left to SDPA: a query row that sees no key at all (only
possible without a prefix: causal attention over left padding, or a fully padded sequence) gives
zeros and zero gradients, as in the reference, not NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None = None,
                     prefix_v: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                     causal: bool = False, scale: float | None = None,
                     attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Same contract as `reference.prefix_attention`: (B, Hq, T, D) in q's dtype; dropout_p is SDPA's
    attention-probability dropout (0 = none, the reference's behaviour)."""
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    P = prefix_k.shape[1] if prefix_k is not None else 0
    if P:
        k = torch.cat([prefix_k.unsqueeze(0).expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
        v = torch.cat([prefix_v.unsqueeze(0).expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)

    if attn_mask is None and not causal:
        if key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=dropout_p)
        if P or bool(key_padding_mask.any(-1).all()):  # every query row sees a key: a (B, 1, 1, P+T) mask
            allowed = F.pad(key_padding_mask.bool(), (P, 0), value=True)[:, None, None, :]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, dropout_p=dropout_p)
    if attn_mask is None and causal and key_padding_mask is None and not P:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p)

    # the general mask, spelled out here rather than shared with the reference: the oracle stays independent
    allowed = torch.ones(B, 1, T, P + T, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        allowed[..., P:] &= key_padding_mask.bool()[:, None, None, :]
    if causal:
        allowed[..., P:] &= torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        allowed = allowed & F.pad(attn_mask.bool(), (P, 0), value=True)
    if P:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, dropout_p=dropout_p)
    empty = ~allowed.any(-1, keepdim=True)  # (B, 1|H, T, 1): rows with no visible key
    if not bool(empty.any()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, dropout_p=dropout_p)
    # let those rows see everything (a finite softmax), then zero them: no NaN forward or backward
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, scale=scale, dropout_p=dropout_p)
    return out.masked_fill(empty, 0.0)
