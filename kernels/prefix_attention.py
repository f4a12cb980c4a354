"""Flash-attention style prefix attention in Triton: forward, backward, autograd, custom op.

Semantics are exactly `reference.prefix_attention` without `attn_mask`: every query attends to
[prefix keys ; sequence keys], the prefix K/V (Hkv, P, D) is shared by the whole batch and always
visible; sequence keys obey the key padding mask and, for decoders, causality (key j <= query i).
Grouped-query attention: query head h reads key/value head h // (Hq / Hkv).

What is fused, and what that saves:
- The prefix and the sequence K/V are read from their own tensors in two loops of one kernel: the
  concatenated (B, Hkv, P + T, D) K/V is never built, and the prefix is never repeated per example
  or per query head (GQA groups share one K/V load through the cache).
- Forward: online softmax in base 2 over key blocks; only O and the log-sum-exp (B, Hq, T) float32
  are written. No (T, P + T) score or probability matrix exists at any time.
- Backward (FlashAttention-2 split): scores and probabilities are recomputed block by block from q,
  k and the saved LSE. `_attn_bwd_dkdv_kernel` owns a block of keys and loops over the queries of
  every head of its GQA group, so dK/dV need no atomics; for the prefix it writes one float32
  partial per example that the wrapper sums over the batch (P x D per head: tiny).
  `_attn_bwd_dq_kernel` owns a block of queries. delta = rowsum(dO * O) comes from a small kernel.
- A query row that sees no key at all (P = 0 and every key padded) gives zeros, as the reference
  does: its LSE is stored as +inf, so every recomputed probability of that row is exactly 0.

Precision: float16/bfloat16 operands go to tensor cores with float32 accumulation; float32 operands
use input_precision "tf32x3" (float32 accuracy). Softmax statistics are always float32. For 16-bit
inputs the default backward ("exact") keeps float32 accuracy where FlashAttention rounds: P and dS
enter their matmuls as hi + lo 16-bit parts (three extra tensor-core products per block), and the
forward also stores O's rounding residual (one more O-sized 16-bit tensor saved for backward) so that
delta = rowsum(dO * O) uses O to float32 accuracy. Rounding once instead (DSXFER_ATTENTION_BACKWARD=fast)
gives gradients 2-4x further from float64 than PyTorch's float32-internal reference, which is outside
the repository's tolerance rule; it exists for speed comparisons.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from dsxfer.kernels import _launch

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256

# Block sizes per element size (H100 first; DSXFER_AUTOTUNE=1 tries the rest) and one for the interpreter.
# float32 tiles are twice the bytes: smaller blocks and fewer pipeline stages keep them in shared memory.
# float32 is the accuracy path (tf32x3 triples the operand registers, so it still spills at head dim 128);
# bf16/fp16 are the speed path.
FWD_CONFIGS = {
    2: [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=4)],
    4: [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)],
}
# Backward defaults are the largest tiles that ptxas (sm_90a, head dim 128, bf16) reports without register
# spills; the tutorial-style 32 x 128 dK/dV tile with 4 warps spills 2.4 KB per thread at head dim 128.
DKDV_CONFIGS = {
    2: [dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3)],
    4: [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)],
}
DQ_CONFIGS = {
    2: [dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)],
    4: [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
        dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)],
}
INTERPRETER_BLOCKS = dict(BLOCK_M=32, BLOCK_N=32)
DELTA_BLOCK_M = 64


def _attn_fwd_kernel(Q, K, V, PK, PV, KPM, O, O_LO, LSE,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_pkh, stride_pkp, stride_pvh, stride_pvp,
                     stride_ob, stride_oh, stride_ot, stride_mb,
                     Hq, T, P, GROUP, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
                     STORE_LO: tl.constexpr):
    """One (query block, batch x query head): O = softmax([q pk^T ; q k^T] * scale) [pv ; v].

    STORE_LO: also store O's rounding residual (O_LO = fp32 O - O, in O's dtype), so that backward's
    delta = rowsum(dO * O) sees O to float32 accuracy (same strides as O).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Stage 1: the shared prefix, visible to every query.
    for n0 in range(0, P, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        k = tl.load(PK + hk * stride_pkh + offs_n[:, None] * stride_pkp + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(PV + hk * stride_pvh + offs_n[:, None] * stride_pvp + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    # Stage 2: the sequence keys, with padding and (for decoders) causality; causal blocks stop at the diagonal.
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        if HAS_KPM:
            n_ok = n_ok & (tl.load(KPM + b * stride_mb + offs_n, mask=n_ok, other=0) != 0)
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=(offs_n < T)[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                    mask=(offs_n < T)[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_m[:, None] >= offs_n[None, :])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_offs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    out_hi = out.to(O.dtype.element_ty)
    tl.store(O + o_offs, out_hi, mask=m_ok[:, None] & d_ok[None, :])
    if STORE_LO:
        tl.store(O_LO + o_offs, (out - out_hi.to(tl.float32)).to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)


def _attn_bwd_delta_kernel(O, O_LO, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt, Hq,
                           T, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           HAS_LO: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O (float32), the softmax-backward row term; O_LO adds O's residual."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_offs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    o = tl.load(O + o_offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_LO:
        o += tl.load(O_LO + o_offs, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :], mask=ok,
                 other=0.0)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do.to(tl.float32), axis=1),
             mask=offs_m < T)


def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, KPM, DK, DV,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_db, stride_dh, stride_dt,
                          stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt, stride_mb,
                          Hq, Hkv, T, NKEYS, GROUP, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, IS_PREFIX: tl.constexpr,
                          PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    """One (key block, batch x kv head): dV = sum P^T dO, dK = scale sum dS^T Q over the GQA group's queries.

    IS_PREFIX: the keys are prefix keys (K, V point at the (Hkv, P, D) prefix, stride_kb = 0): always
    visible, no padding, no causality; DK/DV are this example's float32 partials.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < NKEYS
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    key_visible = n_ok
    if not IS_PREFIX:
        if HAS_KPM:
            key_visible = key_visible & (tl.load(KPM + b * stride_mb + offs_n, mask=n_ok, other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        if not IS_PREFIX:
            lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M  # earlier queries cannot see these keys
    for g in range(0, GROUP):
        h = hk * GROUP + g
        row0 = (b * Hq + h) * T
        for m0 in range(lo, T, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < T
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + row0 + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + row0 + offs_m, mask=m_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (keys, queries)
            visible = key_visible[:, None] & m_ok[None, :]
            if CAUSAL:
                if not IS_PREFIX:
                    visible = visible & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(visible, tl.exp2(s_t - lse[None, :]), 0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            if SPLIT:
                # float32 P and dS as a sum of two 16-bit parts: two tensor-core products, float32 accuracy.
                p_hi = p_t.to(do.dtype)
                dv = tl.dot(p_hi, do, dv)
                dv = tl.dot((p_t - p_hi.to(tl.float32)).to(do.dtype), do, dv)
                ds_hi = ds_t.to(q.dtype)
                dk = tl.dot(ds_hi, q, dk)
                dk = tl.dot((ds_t - ds_hi.to(tl.float32)).to(q.dtype), q, dk)
            else:
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
                dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


def _attn_bwd_dq_kernel(Q, K, V, PK, PV, DO, LSE, DELTA, KPM, DQ,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_pkh, stride_pkp, stride_pvh, stride_pvp,
                        stride_db, stride_dh, stride_dt, stride_dqb, stride_dqh, stride_dqt, stride_mb,
                        Hq, T, P, GROUP, qk_scale, sm_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
                        SPLIT: tl.constexpr):
    """One (query block, batch x query head): dQ = scale sum_j dS_ij k_j over prefix and sequence keys."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    row0 = pid_bh.to(tl.int64) * T
    lse = tl.load(LSE + row0 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row0 + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for n0 in range(0, P, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        k = tl.load(PK + hk * stride_pkh + offs_n[:, None] * stride_pkp + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(PV + hk * stride_pvh + offs_n[:, None] * stride_pvp + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(n_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SPLIT:
            ds_hi = ds.to(k.dtype)
            dq = tl.dot(ds_hi, k, dq)
            dq = tl.dot((ds - ds_hi.to(tl.float32)).to(k.dtype), k, dq)
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

    hi = T
    if CAUSAL:
        hi = tl.minimum(T, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if HAS_KPM:
            n_ok = n_ok & (tl.load(KPM + b * stride_mb + offs_n, mask=n_ok, other=0) != 0)
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_m[:, None] >= offs_n[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SPLIT:
            ds_hi = ds.to(k.dtype)
            dq = tl.dot(ds_hi, k, dq)
            dq = tl.dot((ds - ds_hi.to(tl.float32)).to(k.dtype), k, dq)
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def supports(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """Whether the kernel covers this call (else the dispatcher uses the reference)."""
    return (attn_mask is None and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and q.shape[-1] <= MAX_HEAD_DIM and q.shape[-1] >= 1)


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and not _launch.interpreting(device):
        return "tf32x3"
    return "ieee"


def split_backward(dtype: torch.dtype) -> bool:
    """16-bit backward feeds P and dS to the tensor cores as hi + lo 16-bit parts (float32 accuracy).

    Rounding them to 16 bits once (FlashAttention's choice, DSXFER_ATTENTION_BACKWARD=fast) costs
    three fewer matmuls per block but gives gradients about 2-4x further from the float64 result than
    PyTorch's float32-internal reference, which breaks the repository's tolerance rule.
    """
    if dtype == torch.float32:
        return False
    mode = os.environ.get("DSXFER_ATTENTION_BACKWARD", "exact").strip().lower()
    if mode not in ("exact", "fast"):
        from dsxfer.errors import ConfigError

        raise ConfigError(f"environment variable DSXFER_ATTENTION_BACKWARD={mode!r} is invalid: expected exact or fast")
    return mode == "exact"


def _inner(x: torch.Tensor) -> torch.Tensor:
    """Kernels address the head dimension with stride 1."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _kpm_or_dummy(key_padding_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if key_padding_mask is None:
        return torch.empty((1, 1), dtype=torch.int8, device=q.device)
    return key_padding_mask.to(torch.int8).contiguous()


@torch.library.custom_op("dsxfer::prefix_attention_fwd", mutates_args=())
def prefix_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                             prefix_v: torch.Tensor, key_padding_mask: torch.Tensor | None, causal: bool,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out (B, Hq, T, D) in q's dtype, lse (B, Hq, T) float32 in base 2, +inf for rows that see no key,
    out_lo: out's rounding residual for an exact backward, or an empty tensor)."""
    B, Hq, T, D = q.shape
    Hkv, P = k.shape[1], prefix_k.shape[1]
    dev = q.device
    q, k, v, prefix_k, prefix_v = (_inner(x) for x in (q, k, v, prefix_k, prefix_v))
    kpm = _kpm_or_dummy(key_padding_mask, q)
    out = torch.empty_like(q)
    store_lo = split_backward(q.dtype)
    out_lo = torch.empty_like(q) if store_lo else q.new_empty(0)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=dev)
    common = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), CAUSAL=causal,
                  HAS_KPM=key_padding_mask is not None, PRECISION=_precision(q.dtype, dev), STORE_LO=store_lo)

    def run(cfg):
        grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * Hq)
        _launch.kernel(_attn_fwd_kernel, dev)[grid](
            q, k, v, prefix_k, prefix_v, kpm, out, out_lo, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), prefix_k.stride(0), prefix_k.stride(1),
            prefix_v.stride(0), prefix_v.stride(1), out.stride(0), out.stride(1), out.stride(2), kpm.stride(0),
            Hq, T, P, Hq // Hkv, scale * LOG2E, **common, **_launch.blocks(cfg), **_launch.launch_options(cfg))

    key = (T, P, D, q.dtype, causal, store_lo)
    run(_launch.pick_config("prefix_attention_fwd", key, FWD_CONFIGS[q.element_size()], dev, run, INTERPRETER_BLOCKS))
    return out, lse, out_lo


@prefix_attention_forward.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    B, Hq, T, _ = q.shape
    out_lo = torch.empty_like(q) if split_backward(q.dtype) else q.new_empty(0)
    return torch.empty_like(q), q.new_empty((B, Hq, T), dtype=torch.float32), out_lo


@torch.library.custom_op("dsxfer::prefix_attention_bwd", mutates_args=())
def prefix_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              prefix_k: torch.Tensor, prefix_v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                              out: torch.Tensor, out_lo: torch.Tensor, lse: torch.Tensor, causal: bool,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
    """-> (dq, dk, dv, dprefix_k, dprefix_v); prefix gradients are summed over the batch."""
    B, Hq, T, D = q.shape
    Hkv, P = k.shape[1], prefix_k.shape[1]
    group = Hq // Hkv
    dev = q.device
    q, k, v, prefix_k, prefix_v, out, grad_out = (_inner(x) for x in (q, k, v, prefix_k, prefix_v, out, grad_out))
    kpm = _kpm_or_dummy(key_padding_mask, q)
    block_d = max(16, triton.next_power_of_2(D))
    precision = _precision(q.dtype, dev)
    common = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=causal, HAS_KPM=key_padding_mask is not None,
                  PRECISION=precision, SPLIT=split_backward(q.dtype))
    qk_scale = scale * LOG2E

    delta = torch.empty(B, Hq, T, dtype=torch.float32, device=dev)
    delta_block = 32 if _launch.interpreting(dev) else DELTA_BLOCK_M
    has_lo = out_lo.numel() > 0
    if has_lo and out_lo.stride() != out.stride():  # the delta kernel reads both with O's strides
        out, out_lo = out.contiguous(), out_lo.contiguous()
    _launch.kernel(_attn_bwd_delta_kernel, dev)[(triton.cdiv(T, delta_block), B * Hq)](
        out, out_lo if has_lo else out, grad_out, delta, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), Hq, T,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=delta_block, HAS_LO=has_lo)

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    # Prefix gradients: one float32 partial per example, summed below (no atomics, deterministic).
    dpk_part = torch.empty(B, Hkv, P, D, dtype=torch.float32, device=dev)
    dpv_part = torch.empty(B, Hkv, P, D, dtype=torch.float32, device=dev)

    def run_dkdv(cfg, prefix: bool):
        keys, kk, vv, dkk, dvv = (P, prefix_k, prefix_v, dpk_part, dpv_part) if prefix else (T, k, v, dk, dv)
        if keys == 0:
            return
        kb, vb = (0, 0) if prefix else (kk.stride(0), vv.stride(0))
        grid = (triton.cdiv(keys, cfg["BLOCK_N"]), B * Hkv)
        _launch.kernel(_attn_bwd_dkdv_kernel, dev)[grid](
            q, kk, vv, grad_out, lse, delta, kpm, dkk, dvv,
            q.stride(0), q.stride(1), q.stride(2), kb, kk.stride(-3), kk.stride(-2),
            vb, vv.stride(-3), vv.stride(-2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dkk.stride(0), dkk.stride(1), dkk.stride(2), dvv.stride(0), dvv.stride(1), dvv.stride(2), kpm.stride(0),
            Hq, Hkv, T, keys, group, qk_scale, scale, IS_PREFIX=prefix, **common,
            **_launch.blocks(cfg), **_launch.launch_options(cfg))

    def run_dq(cfg):
        grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * Hq)
        _launch.kernel(_attn_bwd_dq_kernel, dev)[grid](
            q, k, v, prefix_k, prefix_v, grad_out, lse, delta, kpm, dq,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), prefix_k.stride(0), prefix_k.stride(1),
            prefix_v.stride(0), prefix_v.stride(1), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), kpm.stride(0),
            Hq, T, P, group, qk_scale, scale, **common, **_launch.blocks(cfg), **_launch.launch_options(cfg))

    key = (T, P, D, q.dtype, causal, group, common["SPLIT"])
    cfg = _launch.pick_config("prefix_attention_dkdv", key, DKDV_CONFIGS[q.element_size()], dev, lambda c: run_dkdv(c, False),
                              INTERPRETER_BLOCKS)
    run_dkdv(cfg, False)
    run_dkdv(cfg, True)
    run_dq(_launch.pick_config("prefix_attention_dq", key, DQ_CONFIGS[q.element_size()], dev, run_dq, INTERPRETER_BLOCKS))
    dprefix_k = dpk_part.sum(0).to(prefix_k.dtype)
    dprefix_v = dpv_part.sum(0).to(prefix_v.dtype)
    return dq, dk, dv, dprefix_k, dprefix_v


@prefix_attention_backward.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, out_lo, lse, causal, scale):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(prefix_k),
            torch.empty_like(prefix_v))


class PrefixAttentionFunction(torch.autograd.Function):
    """Autograd over the two custom ops; saves q, k, v, the prefix, O and the float32 LSE (no scores)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
        out, lse, out_lo = torch.ops.dsxfer.prefix_attention_fwd(q, k, v, prefix_k, prefix_v, key_padding_mask,
                                                                 causal, scale)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, out_lo, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, prefix_k, prefix_v, key_padding_mask, out, out_lo, lse = ctx.saved_tensors
        dq, dk, dv, dpk, dpv = torch.ops.dsxfer.prefix_attention_bwd(
            grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, out_lo, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, dpk, dpv, None, None, None


def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None = None,
                     prefix_v: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                     causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Triton path of `dsxfer.kernels.prefix_attention` (no attn_mask; see the module docstring)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if prefix_k is None or prefix_k.shape[1] == 0:
        prefix_k = prefix_v = q.new_empty((Hkv, 0, D))
    else:
        prefix_k, prefix_v = prefix_k.to(q.dtype), prefix_v.to(q.dtype)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.bool()
    return PrefixAttentionFunction.apply(q, k, v, prefix_k, prefix_v, key_padding_mask, bool(causal), scale)
