"""Freezing strategies, LoRA and gradual unfreezing: what trains changes, what is frozen stays bitwise equal."""

import re

import pytest
import torch

from dsxfer.config import load_config
from dsxfer.errors import ConfigError
from dsxfer.method.freezing import layer_of
from dsxfer.method.model import TransferModel
from tiny import tiny_backbone


def three_layers(arch="xlm-roberta"):
    """Three layers: freezing.top_k=2 leaves one layer below the trained ones."""
    return tiny_backbone(arch, num_hidden_layers=3)


def config(*overrides):
    return load_config(None, ["model.max_length=64", "model.doc_stride=16", "alignment.enabled=false",
                              "prompts.length=2", "injection.length=2", "injection.reparam=false", *overrides])


def qa_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    ids[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "start_positions": torch.tensor([1, 2, 3, 4]),
            "end_positions": torch.tensor([2, 5, 3, 6])}


def train_steps(model, steps=3, optimizer=None):
    optimizer = optimizer or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for i in range(steps):
        optimizer.zero_grad()
        model(qa_batch(i))["loss"].backward()
        optimizer.step()
    return optimizer


def expected_trainable(name, strategy, num_layers=3, k=2):
    if strategy == "frozen":
        return False
    if strategy == "top_k":
        layer = layer_of(name)
        return (layer is not None and layer >= num_layers - k) or (layer is None and "embed" not in name)
    if strategy == "bias_only":
        return name.endswith("bias")
    if strategy == "layernorm":
        return "LayerNorm" in name
    if strategy == "embeddings_frozen":
        return not name.startswith("embeddings.")
    raise AssertionError(strategy)


@pytest.mark.parametrize("strategy", ["frozen", "top_k", "bias_only", "layernorm", "embeddings_frozen"])
def test_frozen_params_bitwise_unchanged_and_trainable_ones_move(strategy):
    model = TransferModel(three_layers(), config(f"freezing.strategy={strategy}", "freezing.top_k=2"))
    names = dict(model.backbone.named_parameters())
    for name, p in names.items():
        assert p.requires_grad == expected_trainable(name, strategy), name
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("prompt.") for n in trainable) and any(n.startswith("head.") for n in trainable)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


@pytest.mark.parametrize("arch, targets", [("xlm-roberta", "[query, value]"), ("llama", "[q_proj, v_proj]")])
def test_lora_combined_with_prompts_trains_only_adapters_prompts_and_head(arch, targets):
    model = TransferModel(three_layers(arch), config("adapters.lora=true", f"adapters.target_modules={targets}", "adapters.r=4"))
    lora = [n for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 2 * 3  # A and B, two target modules, three layers
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, steps=3)  # LoRA B starts at zero, so A first moves on step 2
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == p.requires_grad, name
        assert p.requires_grad == ("lora_" in name or not name.startswith("backbone.")), name


def test_lora_target_missing_from_model_fails_before_training():
    with pytest.raises(ConfigError, match=r"adapters.target_modules=\['q_proj'\] is invalid: \['q_proj'\] not in this model; its linear modules are: .*query"):
        TransferModel(three_layers(), config("adapters.lora=true", "adapters.target_modules=[q_proj]"))


def test_gradual_unfreezing_schedule_and_optimizer_handover():
    model = TransferModel(three_layers(), config("freezing.strategy=gradual", "freezing.top_k=2", "freezing.unfreeze_every=2"))
    assert not any(p.requires_grad for p in model.backbone.parameters())
    unfreezer = model.unfreezer
    assert unfreezer.step(1) == []
    new = unfreezer.step(2)
    assert new and all(re.match(r"backbone\.encoder\.layer\.2\.", n) for n in new)
    assert unfreezer.step(3) == []
    later = unfreezer.step(10)  # one more layer (layer 1), then the schedule stops at top_k = 2
    assert later and all(n.startswith("backbone.encoder.layer.1.") for n in later)
    assert unfreezer.step(100) == []
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in new + later)
    # a plain torch optimizer takes the newly unfrozen parameters as a new group
    optimizer = torch.optim.AdamW([p for n, p in params.items() if n.startswith(("prompt", "injection", "head"))], lr=1e-2)
    optimizer.add_param_group({"params": [params[n] for n in new + later]})
    before = {n: p.detach().clone() for n, p in params.items()}
    train_steps(model, optimizer=optimizer)
    for name, p in params.items():
        assert torch.equal(p, before[name]) != p.requires_grad, name


def test_summary_counts_trainable_parameters():
    model = TransferModel(three_layers(), config("freezing.strategy=bias_only"))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # by hand: prompt 2x32, prefixes 3 layers x 2 x (4 heads x 2 x 8), head 32x2+2, and the backbone's biases
    biases = sum(p.numel() for n, p in model.backbone.named_parameters() if n.endswith("bias"))
    assert trainable == 64 + 3 * 2 * 64 + 66 + biases
    summary = model.summary()
    assert summary.splitlines()[0] == f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"
    assert "  prompt: 64" in summary
