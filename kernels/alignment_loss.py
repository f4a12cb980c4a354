"""Fused pooled alignment loss (cosine, mse, infonce) in Triton: forward, backward, autograd, custom op.

Semantics are exactly `reference.alignment_loss`: the student hidden states (N, T, H) are masked
mean-pooled, L2-normalised (cosine, infonce; mse stays on the raw pooled vectors) and compared with
the teacher vectors (N, H), a constant that receives no gradient.

What is fused, and what that saves:
- `_pool_kernel`, one program per row: masked mean-pool over T, both L2 normalisations and the
  per-row cosine / squared error, in one read of `hidden`. Padded positions are never loaded. The
  eager reference makes a float32 copy of `hidden` and a masked copy of that (two transient N x T x H
  float32 tensors in forward, and again in backward); here forward allocates (N, H) float32 vectors
  and (N,) vectors only, and those are all autograd saves (never `hidden`).
- `_infonce_fwd_kernel`: the N x N similarity matrix is computed block by block (BLOCK_M rows x
  BLOCK_N columns, reduced over H in BLOCK_K steps) with an online log-sum-exp; only the (N,) LSE is
  kept. The reference holds the N x N logits and their softmax.
- `_infonce_bwd_kernel` recomputes each similarity block from the saved LSE (no N x N matrix in
  backward either) and accumulates softmax @ teacher into an (N, H) float32 buffer that belongs to
  the program's rows (read-modify-write, kept in L2; a barrier orders the writes of one pass before
  the reads of the next).
- `_grad_kernel` folds the loss gradient, the backward of L2 normalisation and of the mean-pool into
  the single write of grad_hidden (N, T, H), in hidden's dtype.

Similarities use tl.dot with input_precision "tf32x3" on float32 operands (three TF32 tensor-core
products: float32 accuracy at tensor-core speed); the interpreter computes them in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsxfer.kernels import _launch

LOSS_KINDS = {"mse": 0, "cosine": 1, "infonce": 2}
NORM_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Block sizes: (H100 first; DSXFER_AUTOTUNE=1 tries the rest), and one for the interpreter.
POOL_CONFIGS = [dict(BLOCK_T=8, num_warps=8), dict(BLOCK_T=4, num_warps=4), dict(BLOCK_T=16, num_warps=8)]
POOL_INTERPRETER = dict(BLOCK_T=16)
# Defaults: no (or, backward, 60 B) register spills at H = 1024 on sm_90a according to ptxas.
INFONCE_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=4),
]
INFONCE_BWD_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
]
INFONCE_INTERPRETER = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64)
GRAD_CONFIGS = [dict(BLOCK_T=16, num_warps=8), dict(BLOCK_T=8, num_warps=4)]
GRAD_INTERPRETER = dict(BLOCK_T=32)


def _pool_kernel(hidden_ptr, mask_ptr, teacher_ptr, pooled_ptr, teacher_out_ptr, rnorm_ptr, count_ptr, row_ptr,
                 T, H, stride_hn, stride_ht, stride_mn, stride_tn,
                 LOSS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row n: s = sum_t w_t h_t / max(sum_t w_t, 1); normalise s and teacher; per-row loss term.

    pooled: raw s (mse) or s / max(|s|, eps); teacher_out: t / max(|t|, eps) (not mse);
    row: sum_h (s - t)^2 (mse), 1 - cos (cosine), cos (infonce: the diagonal similarity).
    """
    n = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    weight = tl.zeros([BLOCK_T], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        w = tl.load(mask_ptr + n * stride_mn + offs_t, mask=offs_t < T, other=0.0)
        # Positions with weight 0 are masked out of the load: padding costs no memory traffic.
        x = tl.load(hidden_ptr + n * stride_hn + offs_t[:, None] * stride_ht + offs_h[None, :],
                    mask=(w != 0)[:, None] & h_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(x * w[:, None], axis=0)
        weight += w
    count = tl.maximum(tl.sum(weight, axis=0), 1.0)
    s = acc / count
    t = tl.load(teacher_ptr + n * stride_tn + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    tl.store(count_ptr + n, count)
    if LOSS == 0:
        d = s - t
        tl.store(pooled_ptr + n * H + offs_h, s, mask=h_ok)
        tl.store(row_ptr + n, tl.sum(d * d, axis=0))
    else:
        rnorm_s = 1.0 / tl.maximum(tl.sqrt(tl.sum(s * s, axis=0)), 1e-12)
        rnorm_t = 1.0 / tl.maximum(tl.sqrt(tl.sum(t * t, axis=0)), 1e-12)
        s_hat = s * rnorm_s
        t_hat = t * rnorm_t
        tl.store(pooled_ptr + n * H + offs_h, s_hat, mask=h_ok)
        tl.store(teacher_out_ptr + n * H + offs_h, t_hat, mask=h_ok)
        tl.store(rnorm_ptr + n, rnorm_s)
        cos = tl.sum(s_hat * t_hat, axis=0)
        if LOSS == 1:
            tl.store(row_ptr + n, 1.0 - cos)
        else:
            tl.store(row_ptr + n, cos)


def _infonce_fwd_kernel(s_ptr, t_ptr, lse_ptr, N, H, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Rows [m0, m0 + BLOCK_M): lse_n = log sum_m exp(<s_n, t_m> / temperature), online over column blocks.

    s, t: (N, H) float32, contiguous. qk_scale = log2(e) / temperature (the softmax runs in base 2).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        sim = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            a = tl.load(s_ptr + offs_m[:, None].to(tl.int64) * H + offs_k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(t_ptr + offs_n[:, None].to(tl.int64) * H + offs_k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            sim = tl.dot(a, tl.trans(b), sim, input_precision=PRECISION)
        z = tl.where(n_ok[None, :], sim * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))  # finite: the first column block always has column 0
        p = tl.exp2(z - m_new[:, None])
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(p, axis=1)
        m_i = m_new
    tl.store(lse_ptr + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=m_ok)


def _infonce_bwd_kernel(s_ptr, t_ptr, lse_ptr, acc_ptr, N, H, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PRECISION: tl.constexpr):
    """acc[n] = sum_m softmax_m(<s_n, t_m> / temperature) t_m for the program's rows (acc starts at 0).

    Each similarity block is recomputed and turned into probabilities with the saved LSE.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    lse2 = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        sim = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            a = tl.load(s_ptr + offs_m[:, None].to(tl.int64) * H + offs_k[None, :],
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(t_ptr + offs_n[:, None].to(tl.int64) * H + offs_k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            sim = tl.dot(a, tl.trans(b), sim, input_precision=PRECISION)
        p = tl.exp2(sim * qk_scale - lse2[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            b = tl.load(t_ptr + offs_n[:, None].to(tl.int64) * H + offs_k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc_ptrs = acc_ptr + offs_m[:, None].to(tl.int64) * H + offs_k[None, :]
            acc_ok = m_ok[:, None] & k_ok[None, :]
            acc = tl.load(acc_ptrs, mask=acc_ok, other=0.0)
            acc = tl.dot(p, b, acc, input_precision=PRECISION)
            tl.store(acc_ptrs, acc, mask=acc_ok)
        # The next column block reads back what this one wrote, possibly from other threads.
        tl.debug_barrier()


def _grad_kernel(grad_loss_ptr, mask_ptr, pooled_ptr, teacher_ptr, teacher_out_ptr, acc_ptr, rnorm_ptr, count_ptr,
                 dh_ptr, T, H, stride_mn, stride_tn, stride_dn, stride_dt, coef,
                 LOSS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """grad_hidden[n, t] = grad_loss * w_nt / count_n * dL/ds_n for BLOCK_T positions of row n.

    dL/ds_n is rebuilt per program from saved (H,) vectors (cheaper than a pass over an (N, H) buffer):
      mse:     coef (s - t), coef = 2 / (N H)
      cosine:  g = -coef t_hat, coef = 1 / N            then through the normalisation:
      infonce: g = coef (acc - t_hat), coef = 1 / (N temperature)
               dL/ds = (g - s_hat <s_hat, g>) / max(|s|, eps)
    """
    n = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < H
    s = tl.load(pooled_ptr + n * H + offs_h, mask=h_ok, other=0.0)
    if LOSS == 0:
        t = tl.load(teacher_ptr + n * stride_tn + offs_h, mask=h_ok, other=0.0).to(tl.float32)
        grad_s = coef * (s - t)
    else:
        t_hat = tl.load(teacher_out_ptr + n * H + offs_h, mask=h_ok, other=0.0)
        if LOSS == 1:
            g = -coef * t_hat
        else:
            g = coef * (tl.load(acc_ptr + n * H + offs_h, mask=h_ok, other=0.0) - t_hat)
        grad_s = (g - s * tl.sum(s * g, axis=0)) * tl.load(rnorm_ptr + n)
    grad_s = grad_s * (tl.load(grad_loss_ptr) / tl.load(count_ptr + n))
    w = tl.load(mask_ptr + n * stride_mn + offs_t, mask=offs_t < T, other=0.0)
    out = w[:, None] * grad_s[None, :]
    if dh_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: the GPU's cast does this already, but the interpreter's float32 ->
        # bfloat16 cast truncates; after this the cast is exact on both.
        bits = out.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        out = bits.to(tl.float32, bitcast=True)
    tl.store(dh_ptr + n * stride_dn + offs_t[:, None] * stride_dt + offs_h[None, :],
             out.to(dh_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & h_ok[None, :])


def _check(hidden: torch.Tensor, mask: torch.Tensor, teacher: torch.Tensor, loss: str) -> None:
    if loss not in LOSS_KINDS:
        raise ValueError(f"unknown alignment loss '{loss}': expected cosine, mse or infonce")
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2] or teacher.shape != (hidden.shape[0], hidden.shape[2]):
        raise ValueError(f"alignment_loss expects hidden (N, T, H), mask (N, T), teacher (N, H); got "
                         f"{tuple(hidden.shape)}, {tuple(mask.shape)}, {tuple(teacher.shape)}")


def _dot_precision(device: torch.device) -> str:
    return "ieee" if _launch.interpreting(device) else "tf32x3"


@torch.library.custom_op("dsxfer::alignment_loss_fwd", mutates_args=())
def alignment_loss_forward(hidden: torch.Tensor, mask: torch.Tensor, teacher: torch.Tensor, loss: str,
                           temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor, torch.Tensor]:
    """-> (loss scalar fp32, pooled (N,H), teacher_hat (N,H) or empty, rnorm (N,), count (N,), lse (N,) or empty)."""
    _check(hidden, mask, teacher, loss)
    kind = LOSS_KINDS[loss]
    N, T, H = hidden.shape
    dev = hidden.device
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    teacher = teacher.detach()
    if teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    weights = mask.to(torch.float32).contiguous()
    f32 = dict(dtype=torch.float32, device=dev)
    pooled = torch.empty(N, H, **f32)
    teacher_hat = torch.empty(N, H, **f32) if kind else torch.empty(0, **f32)
    rnorm = torch.ones(N, **f32)
    count = torch.empty(N, **f32)
    row = torch.empty(N, **f32)
    block_h = triton.next_power_of_2(H)

    def run_pool(cfg):
        _launch.kernel(_pool_kernel, dev)[(N,)](
            hidden, weights, teacher, pooled, teacher_hat, rnorm, count, row, T, H,
            hidden.stride(0), hidden.stride(1), weights.stride(0), teacher.stride(0),
            LOSS=kind, BLOCK_H=block_h, **_launch.blocks(cfg), **_launch.launch_options(cfg))

    cfg = _launch.pick_config("alignment_pool", (T, H, hidden.dtype, kind), POOL_CONFIGS, dev, run_pool,
                              POOL_INTERPRETER)
    run_pool(cfg)

    lse = torch.empty(0, **f32)
    if kind == 0:
        value = row.sum() / (N * H)
    elif kind == 1:
        value = row.mean()
    else:
        lse = torch.empty(N, **f32)
        precision = _dot_precision(dev)

        def run_lse(cfg):
            grid = (triton.cdiv(N, cfg["BLOCK_M"]),)
            _launch.kernel(_infonce_fwd_kernel, dev)[grid](
                pooled, teacher_hat, lse, N, H, LOG2E / temperature, PRECISION=precision,
                **_launch.blocks(cfg), **_launch.launch_options(cfg))

        cfg = _launch.pick_config("infonce_fwd", (N, H), INFONCE_CONFIGS, dev, run_lse, INFONCE_INTERPRETER)
        run_lse(cfg)
        value = (lse - row / temperature).mean()
    return value, pooled, teacher_hat, rnorm, count, lse


@alignment_loss_forward.register_fake
def _(hidden, mask, teacher, loss, temperature):
    N, _, H = hidden.shape
    f32 = dict(dtype=torch.float32, device=hidden.device)
    kind = LOSS_KINDS[loss]
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty((N, H), dtype=torch.float32),
            torch.empty((N, H) if kind else (0,), **f32), torch.empty(N, **f32), torch.empty(N, **f32),
            torch.empty(N if kind == 2 else 0, **f32))


@torch.library.custom_op("dsxfer::alignment_loss_bwd", mutates_args=())
def alignment_loss_backward(grad_loss: torch.Tensor, mask: torch.Tensor, teacher: torch.Tensor, pooled: torch.Tensor,
                            teacher_hat: torch.Tensor, rnorm: torch.Tensor, count: torch.Tensor, lse: torch.Tensor,
                            loss: str, temperature: float, hidden_dtype: torch.dtype) -> torch.Tensor:
    """grad_hidden (N, T, H) in hidden_dtype from what the forward saved (hidden itself is not needed)."""
    kind = LOSS_KINDS[loss]
    N, T = mask.shape
    H = pooled.shape[1]
    dev = pooled.device
    weights = mask.to(torch.float32).contiguous()
    teacher = teacher.detach()
    if teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    grad_loss = grad_loss.to(torch.float32).reshape(1).contiguous()
    acc = torch.empty(0, dtype=torch.float32, device=dev)
    if kind == 2:
        acc = torch.zeros(N, H, dtype=torch.float32, device=dev)
        precision = _dot_precision(dev)

        def run_acc(cfg):
            acc.zero_()
            grid = (triton.cdiv(N, cfg["BLOCK_M"]),)
            _launch.kernel(_infonce_bwd_kernel, dev)[grid](
                pooled, teacher_hat, lse, acc, N, H, LOG2E / temperature, PRECISION=precision,
                **_launch.blocks(cfg), **_launch.launch_options(cfg))

        cfg = _launch.pick_config("infonce_bwd", (N, H), INFONCE_BWD_CONFIGS, dev, run_acc, INFONCE_INTERPRETER)
        run_acc(cfg)
    coef = {0: 2.0 / (N * H), 1: 1.0 / N, 2: 1.0 / (N * temperature)}[kind]
    grad_hidden = torch.empty(N, T, H, dtype=hidden_dtype, device=dev)

    def run_grad(cfg):
        grid = (N, triton.cdiv(T, cfg["BLOCK_T"]))
        _launch.kernel(_grad_kernel, dev)[grid](
            grad_loss, weights, pooled, teacher, teacher_hat, acc, rnorm, count, grad_hidden, T, H,
            weights.stride(0), teacher.stride(0), grad_hidden.stride(0), grad_hidden.stride(1), coef,
            LOSS=kind, BLOCK_H=triton.next_power_of_2(H), **_launch.blocks(cfg), **_launch.launch_options(cfg))

    cfg = _launch.pick_config("alignment_grad", (T, H, hidden_dtype, kind), GRAD_CONFIGS, dev, run_grad,
                              GRAD_INTERPRETER)
    run_grad(cfg)
    return grad_hidden


@alignment_loss_backward.register_fake
def _(grad_loss, mask, teacher, pooled, teacher_hat, rnorm, count, lse, loss, temperature, hidden_dtype):
    return pooled.new_empty((mask.shape[0], mask.shape[1], pooled.shape[1]), dtype=hidden_dtype)


class AlignmentLossFunction(torch.autograd.Function):
    """Autograd over the two custom ops; saves (N, H) and (N,) float32 tensors, never hidden."""

    @staticmethod
    def forward(ctx, hidden, mask, teacher, loss, temperature):
        value, pooled, teacher_hat, rnorm, count, lse = torch.ops.dsxfer.alignment_loss_fwd(
            hidden, mask, teacher, loss, temperature)
        ctx.save_for_backward(mask, teacher, pooled, teacher_hat, rnorm, count, lse)
        ctx.loss, ctx.temperature, ctx.hidden_dtype = loss, temperature, hidden.dtype
        return value

    @staticmethod
    def backward(ctx, grad_value):
        mask, teacher, pooled, teacher_hat, rnorm, count, lse = ctx.saved_tensors
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.ops.dsxfer.alignment_loss_bwd(
                grad_value, mask, teacher, pooled, teacher_hat, rnorm, count, lse, ctx.loss, ctx.temperature,
                ctx.hidden_dtype)
        return grad_hidden, None, None, None, None


def alignment_loss(hidden: torch.Tensor, mask: torch.Tensor, teacher: torch.Tensor, loss: str = "cosine",
                   temperature: float = 0.05) -> torch.Tensor:
    """Triton path of `dsxfer.kernels.alignment_loss` (same arguments, float32 scalar out)."""
    return AlignmentLossFunction.apply(hidden, mask, teacher.detach(), loss, float(temperature))
