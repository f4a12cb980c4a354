"""CpuDropout (dsxfer.method.dropout): the mask's distribution, forward and backward against the mask it
drew, seeding, and the model-wide install."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dsxfer.method.dropout import CpuDropout, install, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_keeps_each_element_with_probability_1_minus_p_in_every_lane(p):
    torch.manual_seed(0)
    n = 1 << 22
    keep, scale = keep_mask(torch.Size([n]), p)
    q = round((1 - p) * 65536) / 65536  # the 16-bit rounding of 1 - p
    assert abs(q - (1 - p)) <= 1 / 131072 and scale == pytest.approx(1 / q, rel=1e-12)
    k = keep.double()
    # each of the four 16-bit lanes of a 64-bit word on its own: a lane with a constant bit would show here
    for lane in range(4):
        m = n // 4
        assert abs(k[lane::4].mean().item() - q) < 5 * math.sqrt(q * (1 - q) / m), lane
    # neighbours (same word and across words) are independent: P(both kept) = q^2
    both = (k[:-1] * k[1:]).mean().item()
    assert abs(both - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / n)


def test_forward_and_backward_use_the_drawn_mask_and_keep_the_expectation():
    x = torch.randn(3, 17, 29, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 17, 29, dtype=torch.float64)
    torch.manual_seed(7)
    keep, scale = keep_mask(x.shape, 0.3)
    torch.manual_seed(7)
    out = CpuDropout(0.3).train()(x)
    out.backward(g)
    expected = torch.where(keep, x.detach() * scale, torch.zeros((), dtype=x.dtype))
    assert torch.equal(out.detach(), expected)
    assert torch.equal(x.grad, torch.where(keep, g * scale, torch.zeros((), dtype=g.dtype)))
    assert 0 < keep.sum() < keep.numel()
    # unbiased: the mean of the output of a constant input is the constant (1e6 elements, std ~ 6.5e-4)
    ones = torch.ones(1_000_000, dtype=torch.float64)
    assert CpuDropout(0.3).train()(ones).mean().item() == pytest.approx(1.0, abs=5e-3)


def test_seeded_like_torch_dropout_and_identity_where_torch_is_used():
    x = torch.randn(64, 64)
    drop = CpuDropout(0.1).train()
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)
    assert not torch.equal(drop(x), a)  # the generator moved on
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(CpuDropout(0.0).train()(x), x)
    # p so close to 0 that 16 bits cannot express it: torch's own dropout (keeps nearly everything, scaled)
    tiny = CpuDropout(1e-7).train()(x)
    assert tiny.shape == x.shape and torch.isfinite(tiny).all()


def test_install_turns_every_plain_dropout_of_a_transfer_model_into_cpu_dropout(tiny_xlmr):
    from dsxfer.config import load_config
    from dsxfer.method.model import build_transfer_model

    cfg = load_config(None, [f"model.name_or_path={tiny_xlmr}", "adapters.lora=true", "adapters.dropout=0.05",
                             "prompts.length=0", "injection.length=0", "alignment.enabled=false"])
    model = build_transfer_model(cfg)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is CpuDropout for m in drops)
    assert any("lora_dropout" in name for name, m in model.named_modules() if isinstance(m, CpuDropout))
    # only the class changed: a second install finds nothing, and a plain module tree round-trips its state
    assert install(model) == 0
    seq = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2))
    before = seq.state_dict()
    assert install(seq) == 1 and seq.state_dict().keys() == before.keys()
