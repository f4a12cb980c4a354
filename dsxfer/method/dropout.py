"""Dropout for CPU training whose random mask costs a quarter of torch's.

On a CPU, `torch.nn.functional.dropout` draws one Bernoulli sample per element (`aten::bernoulli_`): at the
embedded model's shapes that was 10% of a LoRA training step (bench/profile_step.py: 24 calls of 3.4 ms in
an 0.82 s step; the matrix products were 53%). `CpuDropout` draws the same mask from a quarter of the random
bits: one 64-bit word of torch's generator (`random_` over the full 64-bit range, so the seed and
`torch.manual_seed` drive it as before) gives four 16-bit lanes, and an element is kept when its lane is at
least a threshold. The keep probability is thus (1 - p) rounded to a multiple of 1/65536 (0.899994 for
p = 0.1), and the kept elements are scaled by the inverse of that rounded probability, so the output's
expectation is the input exactly, as with torch's dropout. Backward multiplies by the same mask and scale;
the mask is saved as bool (1 byte an element, torch saves 4).

Only the random stream differs from torch's: the same seed gives other (equally distributed) masks. It is
used where it is faster: CPU tensors in training. On a GPU (fused dropout), in eval mode, for p = 0 and for
in-place dropout, `CpuDropout` is `nn.Dropout`. `install` turns every `nn.Dropout` of a model into one
(the class only: no parameters, state dict or hooks change).
"""

from __future__ import annotations

import torch
from torch import nn

_LANES = 65536  # values of a 16-bit lane


def keep_mask(shape: torch.Size, p: float, *, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """(bool mask of `shape`, True with probability ~1 - p; the scale 1 / P(True) that keeps the expectation)."""
    kept = round((1.0 - p) * _LANES)
    n = 1
    for d in shape:
        n *= d
    words = torch.empty(-(-n // 4), dtype=torch.int64).random_(-2**63, None, generator=generator)
    lanes = words.view(torch.int16)[:n]  # uniform over [-32768, 32767]; P(lane >= t) = (32768 - t) / 65536
    return (lanes >= 32768 - kept).view(shape), _LANES / kept


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = keep_mask(x.shape, p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def _fast_path(p: float) -> bool:
    kept = round((1.0 - p) * _LANES)
    return 0 < kept < _LANES  # p too close to 0 or 1 for 16 bits: torch's dropout


class CpuDropout(nn.Dropout):
    """nn.Dropout with the cheaper mask on CPU tensors in training (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace or x.device.type != "cpu" or not _fast_path(self.p):
            return super().forward(x)
        return _Dropout.apply(x, self.p)


def install(model: nn.Module) -> int:
    """Turn every plain nn.Dropout of `model` into a CpuDropout; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Dropout:
            module.__class__ = CpuDropout
            n += 1
    return n
