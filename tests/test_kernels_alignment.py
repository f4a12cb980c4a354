"""Triton alignment loss vs the float64 PyTorch reference, on CPU through Triton's interpreter.

Interpreter guard: tests/conftest.py sets TRITON_INTERPRET=1 before any test module imports triton
(see tests/test_kernels_attention.py); the setdefault below covers running this file on its own.

Tolerance rule (STYLE.md): |kernel - fp64 reference| <= 2 x |reference run in the same dtype - fp64
reference| + a tiny absolute floor where the result is computed in float32 (the loss value for every
input dtype, the gradients for float32 inputs).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dsxfer import kernels  # noqa: E402
from dsxfer.kernels import reference  # noqa: E402
from dsxfer.kernels.alignment_loss import alignment_loss as triton_alignment_loss  # noqa: E402

TEMPERATURE = 0.05


def _inputs(N, T, H, dtype, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    # An offset keeps the pooled vectors away from zero, like real hidden states.
    hidden = (torch.randn(N, T, H, generator=g) + 0.3 * torch.randn(1, 1, H, generator=g)).to(dtype)
    teacher = torch.randn(N, H, generator=g) + 0.3 * torch.randn(1, H, generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    if pad:
        lengths = torch.randint(1, T + 1, (N,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return hidden, mask, teacher


def _run(fn, hidden, mask, teacher, loss, dtype, device="cpu"):
    leaf = hidden.detach().to(device, dtype).requires_grad_()
    teacher = teacher.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    value = fn(leaf, mask.to(device), teacher, loss, TEMPERATURE)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach().double().cpu(), grad.double().cpu()


def _check(N, T, H, loss, dtype, pad, device="cpu"):
    hidden, mask, teacher = _inputs(N, T, H, dtype, pad)
    exact = _run(reference.alignment_loss, hidden, mask, teacher, loss, torch.float64)
    theirs = _run(reference.alignment_loss, hidden, mask, teacher, loss, dtype)
    ours = _run(triton_alignment_loss, hidden, mask, teacher, loss, dtype, device)
    for name, e, t, o in zip(("loss", "grad_hidden"), exact, theirs, ours):
        assert o.shape == e.shape and torch.isfinite(o).all(), name
        floor = 1e-6 * max(1.0, e.abs().max().item()) if (name == "loss" or dtype == torch.float32) else 0.0
        ours_err, their_err = (o - e).abs().max().item(), (t - e).abs().max().item()
        assert ours_err <= 2 * their_err + floor, (
            f"{loss} {name}: kernel error {ours_err:.3g} > 2 x torch {dtype} error {their_err:.3g} + {floor:.1g}")


CASES = [  # (N, T, H): N odd, T odd, H a power of two, a multiple of 128 and a prime
    (1, 5, 32),
    (7, 13, 401),
    (41, 3, 384),
]


@pytest.mark.parametrize("loss", ["cosine", "mse", "infonce"])
@pytest.mark.parametrize("N,T,H", CASES)
def test_float32_matches_fp64_reference(N, T, H, loss):
    _check(N, T, H, loss, torch.float32, pad=True)


@pytest.mark.parametrize("loss", ["cosine", "mse", "infonce"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_hidden_matches_fp64_reference(dtype, loss):
    _check(7, 13, 384, loss, dtype, pad=True)


def test_unpadded_rows():
    _check(7, 9, 32, "infonce", torch.float32, pad=False)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["cosine", "mse", "infonce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 7, 41, 67])
@pytest.mark.parametrize("T", [1, 13, 33])
@pytest.mark.parametrize("H", [32, 384, 401, 1024])
@pytest.mark.parametrize("pad", [False, True])
def test_exhaustive_grid(pad, H, T, N, dtype, loss):
    _check(N, T, H, loss, dtype, pad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss", ["cosine", "mse", "infonce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,T,H", [(7, 13, 401), (300, 33, 1024)])
def test_compiled_kernels_on_gpu(N, T, H, dtype, loss):
    _check(N, T, H, loss, dtype, pad=True, device="cuda")


def test_teacher_is_a_constant():
    """A teacher that requires grad gets none and changes nothing; a fully padded row gets zero gradient."""
    hidden, mask, teacher = _inputs(7, 13, 32, torch.float32, pad=True, seed=2)
    mask[3] = 0
    leaf = hidden.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    value = triton_alignment_loss(leaf, mask, t, "infonce", TEMPERATURE)
    value.backward()
    assert t.grad is None
    assert leaf.grad[3].abs().max() == 0
    assert (leaf.grad * (1 - mask[..., None])).abs().max() == 0  # padded positions get nothing
    torch.testing.assert_close(value, reference.alignment_loss(hidden, mask, teacher, "infonce", TEMPERATURE))


def test_autograd_saves_no_token_level_tensor():
    """Backward keeps (N, H) and (N, T) tensors only, never hidden-sized ones (hidden is not needed)."""
    N, T, H = 7, 13, 32
    hidden, mask, teacher = _inputs(N, T, H, torch.float16, pad=True)
    for loss in ("cosine", "mse", "infonce"):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            triton_alignment_loss(hidden.clone().requires_grad_(), mask, teacher, loss, TEMPERATURE)
        assert sizes and max(sizes) <= max(N * H, N * T), (loss, sizes)


def test_dispatch_switch(monkeypatch):
    hidden, mask, teacher = _inputs(7, 13, 32, torch.float32, pad=True)
    leaf = hidden.clone().requires_grad_()
    monkeypatch.setenv("DSXFER_KERNELS", "triton")
    assert "AlignmentLossFunction" in type(kernels.alignment_loss(leaf, mask, teacher, "cosine").grad_fn).__name__
    # float64 is the oracle dtype: always the reference.
    assert "AlignmentLossFunction" not in type(
        kernels.alignment_loss(leaf.double(), mask, teacher, "cosine").grad_fn).__name__
    monkeypatch.setenv("DSXFER_KERNELS", "reference")
    assert "AlignmentLossFunction" not in type(kernels.alignment_loss(leaf, mask, teacher, "cosine").grad_fn).__name__


def test_torch_compile_traces_the_custom_ops():
    hidden, mask, teacher = _inputs(7, 13, 32, torch.float32, pad=True, seed=4)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(h, m, t, loss, temperature):
        return triton_alignment_loss(h, m, t, loss, temperature)

    compiled = _run(step, hidden, mask, teacher, "infonce", torch.float32)
    exact = _run(reference.alignment_loss, hidden, mask, teacher, "infonce", torch.float64)
    for a, b in zip(compiled, exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
