"""Pure PyTorch references for dsxfer's fused kernels.

They are the CPU path (any device without Triton) and the oracle every kernel is tested against;
the benchmarks import them as the eager baseline. Written for clarity, not speed: they materialise
what the kernels avoid (the concatenated prefix K/V, the N x N similarity matrix).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over [prefix keys ; sequence keys].

    q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with Hq a multiple of Hkv (grouped-query attention);
    prefix_k, prefix_v: (Hkv, P, D), shared by the whole batch, or None (P = 0).
    key_padding_mask: (B, T) bool, True = a real token. causal: query i sees sequence keys j <= i.
    attn_mask: optional (B, 1 or Hq, T, T) bool, True = may attend, for sequence keys (general masks
    the kernel does not take). Prefix keys are visible to every query in every case.
    Returns (B, Hq, T, D) in q's dtype; softmax in float32 (float64 stays float64).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    if prefix_k is not None and prefix_k.shape[1] > 0:
        P = prefix_k.shape[1]
        k = torch.cat([prefix_k.unsqueeze(0).expand(B, -1, -1, -1).to(k.dtype), k], dim=2)
        v = torch.cat([prefix_v.unsqueeze(0).expand(B, -1, -1, -1).to(v.dtype), v], dim=2)
    else:
        P = 0
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)

    scores = torch.matmul(q.to(cdtype), k.to(cdtype).transpose(-1, -2)) * scale  # (B, Hq, T, P+T)
    allowed = torch.ones(B, 1, T, P + T, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        allowed[..., P:] &= key_padding_mask.bool()[:, None, None, :]
    if causal:
        allowed[..., P:] &= torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        allowed = allowed & F.pad(attn_mask.bool(), (P, 0), value=True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A query row with no visible key (only possible when P = 0) gives zeros, not NaN.
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v.to(cdtype)).to(q.dtype)


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, T, H), (N, T) -> (N, H): mean over the positions where mask is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def alignment_loss(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    teacher: torch.Tensor,
    loss: str = "cosine",
    temperature: float = 0.05,
) -> torch.Tensor:
    """Pooled knowledge-alignment loss of student token states against cached teacher vectors.

    hidden: (N, T, H) student hidden states on the target sentences; mask: (N, T), 1 = real token;
    teacher: (N, H) masked mean-pooled teacher states on the source sentences (a constant).
      cosine:  mean_n (1 - cos(s_n, t_n))
      mse:     mean over n and h of (s_nh - t_nh)^2 on the raw pooled vectors
      infonce: mean_n -log softmax_m(<s_n, t_m> / temperature)[n] on L2-normalised vectors
               (the other rows of the batch are the negatives)
    Returns a scalar in float32 (float64 for float64 inputs).
    """
    cdtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    s = masked_mean_pool(hidden.to(cdtype), mask)
    t = teacher.to(cdtype)
    if loss == "mse":
        return (s - t).pow(2).mean()
    s = F.normalize(s, dim=-1)
    t = F.normalize(t, dim=-1)
    if loss == "cosine":
        return (1.0 - (s * t).sum(-1)).mean()
    if loss == "infonce":
        logits = s @ t.T / temperature
        return F.cross_entropy(logits, torch.arange(len(s), device=s.device))
    raise ValueError(f"unknown alignment loss '{loss}': expected cosine, mse or infonce")
