"""Triton prefix attention vs the float64 PyTorch reference, on CPU through Triton's interpreter.

Interpreter guard: Triton picks interpreter or compiler when it is first imported, and another test
module may import triton (through dsxfer) before this one. tests/conftest.py therefore sets
TRITON_INTERPRET=1 for the whole pytest process on GPU-less machines, before any test module is
imported; the setdefault below only covers running this file without that conftest. Kernels are
wrapped per launch (dsxfer/kernels/_launch.py): CPU tensors always get an InterpretedFunction, and a
process whose triton was imported without the interpreter gets a one-line error instead of a crash.

Tolerance rule (STYLE.md): |kernel - fp64 reference| <= 2 x |reference run in the same dtype - fp64
reference| + a tiny absolute floor (float32 only, where both errors are at rounding level).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dsxfer import kernels  # noqa: E402
from dsxfer.errors import ConfigError  # noqa: E402
from dsxfer.kernels import _launch, reference, sdpa  # noqa: E402
from dsxfer.kernels.prefix_attention import _attn_fwd_kernel, prefix_attention as triton_prefix_attention  # noqa: E402

# Kernel and reference both compute in float32 whatever the input dtype, so the floor is a float32 one for
# every dtype (an exactly-zero reference gradient, e.g. one visible key, is matched only to ~1e-7).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
NAMES = ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


def _inputs(B, Hq, Hkv, T, P, D, dtype, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (Hq, Hkv, Hkv))
    pk, pv = torch.randn(Hkv, P, D, generator=g), torch.randn(Hkv, P, D, generator=g)
    kpm = None
    if pad:
        kpm = torch.ones(B, T, dtype=torch.bool)
        kpm[0, (T + 1) // 2:] = False  # right padding on the first example
        if B > 1:
            kpm[-1, : T // 3] = False  # left padding on the last one
    grad_out = torch.randn(B, Hq, T, D, generator=g)
    return [x.to(dtype) for x in (q, k, v, pk, pv)], kpm, grad_out.to(dtype)


def _run(fn, tensors, kpm, grad_out, causal, dtype, device="cpu"):
    leaves = [x.detach().to(device, dtype).requires_grad_() for x in tensors]
    kpm = None if kpm is None else kpm.to(device)
    out = fn(*leaves, key_padding_mask=kpm, causal=causal)
    grads = torch.autograd.grad(out, leaves, grad_out.to(device, dtype), allow_unused=True, materialize_grads=True)
    return [out.detach().double().cpu()] + [g.double().cpu() for g in grads]


def _check(B, Hq, Hkv, T, P, D, causal, pad, dtype, device="cpu", slack=2.0, fn=triton_prefix_attention):
    tensors, kpm, grad_out = _inputs(B, Hq, Hkv, T, P, D, dtype, pad)
    exact = _run(reference.prefix_attention, tensors, kpm, grad_out, causal, torch.float64)
    torch_same_dtype = _run(reference.prefix_attention, tensors, kpm, grad_out, causal, dtype)
    kernel = _run(fn, tensors, kpm, grad_out, causal, dtype, device)
    for name, ref, theirs, ours in zip(NAMES, exact, torch_same_dtype, kernel):
        assert ours.shape == ref.shape, name
        assert torch.isfinite(ours).all(), f"{name}: non-finite values"
        if ref.numel() == 0:
            continue
        ours_err = (ours - ref).abs().max().item()
        their_err = (theirs - ref).abs().max().item()
        assert ours_err <= slack * their_err + FLOOR[dtype], (
            f"{name}: kernel error {ours_err:.3g} > {slack} x torch {dtype} error {their_err:.3g} + {FLOOR[dtype]}")


# (B, Hq, Hkv, T, P, D, causal, pad): every P in {0, 1, 7, 16}, T in {1, 13, 128}, D in {32, 64},
# causal and not, padding and not, GQA and not; fp16 only where it differs from fp32.
CASES = [
    (2, 4, 2, 13, 0, 32, False, True, torch.float32),    # no prefix, a fully left-padded example, GQA
    (1, 2, 2, 1, 1, 64, True, False, torch.float32),     # a single query that sees prefix + itself
    (2, 4, 2, 13, 7, 32, True, True, torch.float32),     # decoder: causal + padding + GQA
    (1, 4, 1, 128, 16, 64, True, True, torch.float32),   # several key/query blocks, GQA group of 4
    (2, 2, 2, 128, 7, 32, False, True, torch.float32),   # encoder, partial last blocks
    (2, 2, 1, 13, 16, 64, False, True, torch.float16),
    (1, 2, 1, 128, 7, 32, True, True, torch.float16),
    (1, 2, 2, 128, 0, 64, True, False, torch.float16),
]


@pytest.mark.parametrize("B,Hq,Hkv,T,P,D,causal,pad,dtype", CASES)
def test_forward_and_gradients_match_fp64_reference(B, Hq, Hkv, T, P, D, causal, pad, dtype):
    _check(B, Hq, Hkv, T, P, D, causal, pad, dtype)


# the CPU path: the same rule for PyTorch's fused SDPA, plus causal attention over left padding without a
# prefix (query rows that see no key: zeros, not NaN) and bfloat16
SDPA_CASES = CASES + [(2, 4, 2, 13, 0, 32, True, True, torch.float32), (2, 2, 2, 13, 0, 32, False, False, torch.float32),
                      (1, 2, 2, 128, 0, 32, True, False, torch.float32), (2, 4, 1, 128, 16, 32, False, True, torch.bfloat16),
                      (2, 4, 2, 13, 0, 32, True, True, torch.bfloat16)]


@pytest.mark.parametrize("B,Hq,Hkv,T,P,D,causal,pad,dtype", SDPA_CASES)
def test_sdpa_path_matches_fp64_reference(B, Hq, Hkv, T, P, D, causal, pad, dtype):
    """In 16 bits SDPA's CPU kernel rounds P and dS to the input dtype, as FlashAttention does (and as the
    Triton kernel's fast backward mode): the 4x rule of that mode; float32 keeps the 2x rule."""
    _check(B, Hq, Hkv, T, P, D, causal, pad, dtype, fn=sdpa.prefix_attention, slack=2.0 if dtype == torch.float32 else 4.0)


@pytest.mark.parametrize("P", [0, 7])
def test_sdpa_path_takes_a_general_mask_and_fully_padded_rows(P):
    """A general (B, 1, T, T) mask, and an example with no real token at all: the reference's answer."""
    tensors, _, grad_out = _inputs(2, 2, 2, 13, P, 32, torch.float32, pad=False, seed=11)
    attn_mask = torch.rand(2, 1, 13, 13, generator=torch.Generator().manual_seed(1)) > 0.5
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[1] = False
    for mask_kw in ({"attn_mask": attn_mask}, {"key_padding_mask": kpm}):
        leaves = [[x.double().clone().requires_grad_() for x in tensors], [x.clone().requires_grad_() for x in tensors]]
        outs = [reference.prefix_attention(*leaves[0], **mask_kw), sdpa.prefix_attention(*leaves[1], **mask_kw)]
        grads = [torch.autograd.grad(o, leaf, grad_out.to(o.dtype), allow_unused=True, materialize_grads=True)
                 for o, leaf in zip(outs, leaves)]
        torch.testing.assert_close(outs[1].double(), outs[0], rtol=1e-5, atol=1e-5)
        for mine, exact in zip(grads[1], grads[0]):
            assert torch.isfinite(mine).all()
            torch.testing.assert_close(mine.double(), exact, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("P", [0, 1, 7, 16])
@pytest.mark.parametrize("T", [1, 13, 128])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)])
def test_exhaustive_grid(heads, pad, causal, D, T, P, dtype):
    _check(2, heads[0], heads[1], T, P, D, causal, pad, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,T,P,D,causal,pad", [
    (2, 4, 2, 13, 0, 32, False, True), (1, 4, 1, 128, 16, 64, True, True), (2, 8, 2, 300, 7, 128, True, True),
    (2, 8, 8, 257, 64, 128, False, True), (1, 4, 4, 1, 1, 64, True, False)])
def test_compiled_kernels_on_gpu(B, Hq, Hkv, T, P, D, causal, pad, dtype):
    """The same rule on the GPU, compiled, with bf16 and head dim 128 (out of the interpreter's reach)."""
    _check(B, Hq, Hkv, T, P, D, causal, pad, dtype, device="cuda")


@pytest.mark.parametrize("B,Hq,Hkv,T,P,D,causal,pad", [(2, 4, 1, 13, 7, 64, True, True)])
def test_fast_backward_mode(monkeypatch, B, Hq, Hkv, T, P, D, causal, pad):
    """DSXFER_ATTENTION_BACKWARD=fast rounds P and dS to 16 bits once, as FlashAttention does: outside the
    2x rule (up to 3.6x on the exhaustive grid), inside 4x; the default exact mode is what the rule checks."""
    monkeypatch.setenv("DSXFER_ATTENTION_BACKWARD", "fast")
    _check(B, Hq, Hkv, T, P, D, causal, pad, torch.float16, slack=4.0)


def test_prefix_is_shared_not_repeated():
    """The prefix gradient is the sum over the batch: B copies of one example give B x its gradient."""
    tensors, _, grad_out = _inputs(1, 2, 2, 13, 7, 32, torch.float32, pad=False, seed=3)
    q, k, v, pk, pv = tensors
    single = _run(triton_prefix_attention, [q, k, v, pk, pv], None, grad_out, False, torch.float32)
    rep = [x.expand(3, -1, -1, -1).contiguous() for x in (q, k, v)]
    triple = _run(triton_prefix_attention, rep + [pk, pv], None, grad_out.expand(3, -1, -1, -1), False, torch.float32)
    torch.testing.assert_close(triple[4], 3 * single[4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(triple[5], 3 * single[5], rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_follow_strides():
    """HF hands over (B, H, T, D) views of (B, T, H, D) projections: strides, not copies."""
    tensors, kpm, grad_out = _inputs(2, 2, 2, 13, 7, 32, torch.float32, pad=True, seed=5)
    q, k, v, pk, pv = tensors
    q_view, k_view, v_view = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not q_view.is_contiguous()
    torch.testing.assert_close(triton_prefix_attention(q_view, k_view, v_view, pk, pv, kpm),
                               reference.prefix_attention(q, k, v, pk, pv, kpm), rtol=1e-5, atol=1e-5)


def test_cpu_launch_is_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(_launch.kernel(_attn_fwd_kernel, torch.device("cpu")), InterpretedFunction)


def test_dispatch_switch(monkeypatch):
    tensors, kpm, _ = _inputs(1, 2, 2, 13, 7, 32, torch.float32, pad=True)
    q, k, v, pk, pv = tensors
    monkeypatch.setenv("DSXFER_KERNELS", "auto")
    assert kernels.backend(q.device) == "sdpa"  # CPU tensors: PyTorch's fused attention by default
    grad_fn = lambda: type(kernels.prefix_attention(q.clone().requires_grad_(), k, v, pk, pv).grad_fn).__name__  # noqa: E731
    assert "ScaledDotProduct" in grad_fn()
    monkeypatch.setenv("DSXFER_KERNELS", "reference")  # the oracle: matmul + softmax
    assert "ScaledDotProduct" not in grad_fn()
    monkeypatch.setenv("DSXFER_KERNELS", "triton")
    out = kernels.prefix_attention(q, k, v, pk, pv, key_padding_mask=kpm, causal=True)
    assert out.grad_fn is None  # no grad requested; check it went through the custom op instead
    q_leaf = q.clone().requires_grad_()
    assert "PrefixAttentionFunction" in type(kernels.prefix_attention(q_leaf, k, v, pk, pv).grad_fn).__name__
    # A general mask is not a kernel input: the dispatcher falls back to SDPA, the reference's answer.
    attn_mask = torch.rand(1, 1, 13, 13, generator=torch.Generator().manual_seed(0)) > 0.3
    fallback = kernels.prefix_attention(q_leaf, k, v, pk, pv, attn_mask=attn_mask)
    assert "PrefixAttentionFunction" not in type(fallback.grad_fn).__name__
    torch.testing.assert_close(fallback, reference.prefix_attention(q, k, v, pk, pv, attn_mask=attn_mask))
    monkeypatch.setenv("DSXFER_KERNELS", "cuda-please")
    with pytest.raises(ConfigError, match="DSXFER_KERNELS"):
        kernels.prefix_attention(q, k, v, pk, pv)


def test_torch_compile_traces_the_custom_ops():
    """register_fake lets torch.compile trace the ops in one graph (aot_eager: no C++ compiler needed)."""
    tensors, kpm, grad_out = _inputs(1, 2, 1, 13, 7, 32, torch.float32, pad=True, seed=7)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(q, k, v, pk, pv, key_padding_mask, causal):
        return triton_prefix_attention(q, k, v, pk, pv, key_padding_mask=key_padding_mask, causal=causal)

    compiled = _run(step, tensors, kpm, grad_out, True, torch.float32)
    eager = _run(reference.prefix_attention, tensors, kpm, grad_out, True, torch.float64)
    for name, a, b in zip(NAMES, compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
