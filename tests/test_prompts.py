"""Soft prompts and prompt injection on tiny real transformers models (XLM-R, BERT, Llama, Qwen2)."""

import copy
import math

import pytest
import torch
from transformers import AttentionInterface
from transformers import masking_utils

from dsxfer.method import prompts
from dsxfer.errors import ConfigError, DataError
from dsxfer.method.model import TransferModel
from tiny import config, tiny_backbone

ENCODERS = ("xlm-roberta", "bert")
DECODERS = ("llama", "qwen2")


def batch(seed=1, B=3, T=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if B >= 3:
        mask[1, 6:] = 0  # right padding in two rows
        mask[2, 4:] = 0
    ids[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ENCODERS + DECODERS)
def test_prompts_disabled_equal_plain_backbone(arch):
    plain = tiny_backbone(arch).eval()
    model = TransferModel(tiny_backbone(arch), config("prompts.length=0", "injection.length=0")).eval()
    b = batch()
    with torch.no_grad():
        out = model(b)
        states = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        start, end = model.head(states)
    real = b["attention_mask"].bool()
    assert model.backbone.config._attn_implementation == prompts.ATTN_IMPLEMENTATION
    torch.testing.assert_close(out["start_logits"][real], start[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["end_logits"][real], end[real], atol=1e-5, rtol=1e-5)


# An independent fp64 attention with the prefix concatenated by hand. It gets transformers' own
# materialised 4D boolean mask (causal and padding already inside), so it shares nothing with
# dsxfer's mask translation or with the kernel.
MANUAL = "test_manual_prefix"


def _manual_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    prefix_k, prefix_v = (prompts._active.prefixes or {}).get(str(module.layer_idx), (None, None))
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    if prefix_k is not None:
        key = torch.cat([prefix_k.unsqueeze(0).expand(B, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_v.unsqueeze(0).expand(B, -1, -1, -1), value], dim=2)
    P = key.shape[2] - T
    key = key.repeat_interleave(Hq // Hkv, dim=1)  # grouped-query attention by copying each kv head
    value = value.repeat_interleave(Hq // Hkv, dim=1)
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else 1 / math.sqrt(D))
    allowed = torch.ones(B, 1, T, P + T, dtype=torch.bool)
    if attention_mask is not None:
        allowed[..., P:] = attention_mask
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ value).transpose(1, 2), None


def _manual_mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return masking_utils.sdpa_mask(*args, **kwargs)


AttentionInterface.register(MANUAL, _manual_attention)
masking_utils.AttentionMaskInterface.register(MANUAL, _manual_mask)


@pytest.mark.parametrize("arch", ["xlm-roberta", "llama"])
@pytest.mark.parametrize("reparam", [False, True])
def test_injected_attention_matches_hand_concatenation_fp64(arch, reparam):
    cfg = config("prompts.length=2", "injection.length=3", "injection.layers=all", f"injection.reparam={str(reparam).lower()}",
                 "injection.reparam_hidden=16")
    model = TransferModel(tiny_backbone(arch), cfg).double().eval()
    for p in model.injection.parameters():  # larger prefixes so that they matter in the comparison
        p.data.normal_(0, 0.5)
    twin = copy.deepcopy(model)
    twin.backbone.config._attn_implementation = MANUAL
    b = batch()
    b["start_positions"] = torch.tensor([1, 2, 0])
    b["end_positions"] = torch.tensor([3, 4, 1])
    outs = []
    for m in (model, twin):
        out = m(b)
        out["loss"].backward()
        outs.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    (o1, g1), (o2, g2) = outs
    real = b["attention_mask"].bool()
    torch.testing.assert_close(o1["start_logits"][real], o2["start_logits"][real], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(o1["end_logits"][real], o2["end_logits"][real], atol=1e-10, rtol=1e-10)
    assert set(g1) == set(g2) and any("injection" in n for n in g1)
    for name in g1:
        assert g1[name].abs().sum() > 0, name
        torch.testing.assert_close(g1[name], g2[name], atol=1e-10, rtol=1e-8, msg=name)


def test_decoder_prefix_is_visible_to_every_query_and_keeps_causality():
    cfg = config("prompts.length=0", "injection.length=2", "injection.reparam=false")
    model = TransferModel(tiny_backbone("qwen2"), cfg).eval()
    b = batch(B=1, T=8)
    with torch.no_grad():
        base = model(b)["start_logits"]
        changed = dict(b)
        changed["input_ids"] = b["input_ids"].clone()
        changed["input_ids"][0, 5] = 7 if int(b["input_ids"][0, 5]) != 7 else 8
        after = model(changed)["start_logits"]
        model.injection.keys["0"].data.add_(1.0)
        moved = model(b)["start_logits"]
    # causal: changing token 5 leaves positions 0..4 alone; the prefix reaches position 0 already
    torch.testing.assert_close(after[0, :5], base[0, :5])
    assert (after[0, 5:] - base[0, 5:]).abs().min() > 0
    assert (moved[0] - base[0]).abs().min() > 0


def test_top_layer_injection_leaves_lower_layers_alone():
    cfg = config("prompts.length=0", "injection.length=2", "injection.layers=[1]", "injection.reparam=false")
    model = TransferModel(tiny_backbone("xlm-roberta"), cfg).eval()
    plain = tiny_backbone("xlm-roberta").eval()
    b = batch()
    with torch.no_grad():
        ours, _ = model._encode(b["input_ids"], b["attention_mask"], None, prompted=True, hidden_states=True)
        ref = plain(**b, output_hidden_states=True)
    real = b["attention_mask"].bool()
    torch.testing.assert_close(ours.hidden_states[1][real], ref.hidden_states[1][real], atol=1e-5, rtol=1e-5)
    assert (ours.hidden_states[2][real] - ref.hidden_states[2][real]).abs().max() > 1e-3


def test_soft_prompt_initialised_from_vocabulary_and_text():
    backbone = tiny_backbone("bert")
    emb = backbone.get_input_embeddings()
    init = prompts.vocabulary_init(emb, 5, token_ids=[7, 9])
    torch.testing.assert_close(init, emb.weight[[7, 9, 7, 9, 7]].detach())
    rand = prompts.vocabulary_init(emb, 6, generator=torch.Generator().manual_seed(0))
    rows = [(emb.weight.detach() == r).all(-1).nonzero() for r in rand]
    assert all(len(r) == 1 and r.item() >= 4 for r in rows)  # each row is a real, non-special vocabulary row


def test_task_and_language_prompts_saved_separately_and_composed(tmp_path):
    hidden = 32
    task = prompts.SoftPrompt(3, hidden)
    lang = prompts.SoftPrompt(2, hidden)
    task.save(tmp_path / "task.safetensors")
    lang.save(tmp_path / "lang.safetensors")
    cfg = config("prompts.length=0", "injection.length=0", f"prompts.task_prompt={tmp_path / 'task.safetensors'}",
                 f"prompts.language_prompt={tmp_path / 'lang.safetensors'}")
    model = TransferModel(tiny_backbone("xlm-roberta"), cfg).eval()
    assert model.num_virtual_tokens == 5
    composed = model.prompt(1)[0]
    torch.testing.assert_close(composed, torch.cat([task.embeddings, lang.embeddings]).detach())
    assert not any(p.requires_grad for p in model.prompt.parameters())  # loaded prompts stay frozen
    b = batch()
    with torch.no_grad():
        out = model(b)
    assert out["start_logits"].shape == b["input_ids"].shape  # virtual positions are cut off


def test_bad_prompt_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="prompt file not found"):
        prompts.SoftPrompt.load(tmp_path / "none.safetensors", 32)
    prompts.SoftPrompt(2, 16).save(tmp_path / "narrow.safetensors")
    with pytest.raises(DataError, match="needs width 32"):
        prompts.SoftPrompt.load(tmp_path / "narrow.safetensors", 32)


def test_prefix_on_missing_layer_fails_before_training():
    with pytest.raises(ConfigError, match=r"injection.layers=\[0, 5\] is invalid: layer 5 does not exist, this backbone has 2 layers"):
        TransferModel(tiny_backbone("xlm-roberta"), config("injection.layers=[0, 5]"))


def test_reparameterised_prefixes_merge_to_plain_tensors():
    backbone = tiny_backbone("llama")
    injection = prompts.PromptInjection(backbone.config, 3, [0, 1], reparam=True, reparam_hidden=8)
    merged = injection.merged()
    live = injection()
    assert set(merged) == {"prefix.0.key", "prefix.0.value", "prefix.1.key", "prefix.1.value"}
    for layer in ("0", "1"):
        assert merged[f"prefix.{layer}.key"].shape == (2, 3, 8)  # (kv heads, P, head dim)
        torch.testing.assert_close(merged[f"prefix.{layer}.key"], live[layer][0].detach())
        torch.testing.assert_close(merged[f"prefix.{layer}.value"], live[layer][1].detach())
    assert not torch.equal(merged["prefix.0.key"], merged["prefix.1.key"])


ZERO3_SCRIPT = r'''
import os, sys
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
sys.path.insert(0, sys.argv[2])
import torch, deepspeed
from dsxfer.method import prompts
from tiny import tiny_backbone
deepspeed.init_distributed(dist_backend="gloo")
reference = tiny_backbone().get_input_embeddings().weight.detach().clone()
sharded = tiny_backbone()  # the same seed: the same weights, then partitioned
deepspeed.zero.Init(module=sharded, config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}})
weight = sharded.get_input_embeddings().weight
assert hasattr(weight, "ds_id") and weight.numel() == 0, "the embedding should be partitioned"
got = prompts.vocabulary_init(sharded.get_input_embeddings(), 4, token_ids=[7, 9, 11])
torch.testing.assert_close(got, reference[[7, 9, 11, 7]])
print("gathered", tuple(got.shape))
'''


@pytest.mark.distributed
def test_soft_prompt_init_reads_zero3_partitioned_embedding(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from launch import free_port, launch_env

    script = tmp_path / "zero3_init.py"
    script.write_text(ZERO3_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(free_port()), str(Path(__file__).parent)], capture_output=True,
                         text=True, timeout=300, env=launch_env())
    assert run.returncode == 0, run.stderr[-3000:]
    assert "gathered (4, 32)" in run.stdout


@pytest.mark.parametrize("causal", [False, True])
def test_every_mask_form_transformers_may_pass_gives_the_same_attention(causal):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D, P = 2, 4, 2, 6, 8, 3
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    prefix = {"0": (torch.randn(Hkv, P, D, generator=g, dtype=torch.float64),
                    torch.randn(Hkv, P, D, generator=g, dtype=torch.float64))}
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[1, 4:] = False
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = 0, causal
    allowed = padding[:, None, None, :].expand(B, 1, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
    additive = torch.zeros(B, 1, T, T, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    outs = []
    with prompts.active_prefixes(prefix):
        for mask in (padding, allowed, additive):
            outs.append(prompts.prefix_attention_forward(module, q, k, v, mask)[0])
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(outs[2], outs[0])
    # and against the hand-concatenated attention of this file
    with prompts.active_prefixes(prefix):
        manual, _ = _manual_attention(module, q, k, v, allowed)
    real = padding[:, :, None].expand(B, T, Hq)
    torch.testing.assert_close(outs[0][real], manual[real])


@pytest.mark.parametrize("arch", ["xlm-roberta", "bert"])
def test_attention_dropout_option_draws_the_same_dropout_as_transformers_own_sdpa(arch):
    # hidden-state dropout 0, attention-probability dropout 0.3: the only randomness is inside attention
    fields = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.3)
    ids = torch.randint(3, 120, (3, 11))
    hf = tiny_backbone(arch, attn_implementation="sdpa", **fields).train()
    torch.manual_seed(5)
    reference = hf(input_ids=ids).last_hidden_state
    hf_eval = hf.eval()(input_ids=ids).last_hidden_state

    ours = tiny_backbone(arch, **fields).train()  # the same seed: the same weights
    prompts.use_prefix_attention(ours, attention_dropout=True)
    torch.manual_seed(5)
    torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, reference, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(reference, hf_eval, atol=1e-3)  # the dropout really acted
    torch.testing.assert_close(ours.eval()(input_ids=ids).last_hidden_state, hf_eval, atol=1e-6, rtol=1e-6)
    # off (the default): no attention-probability dropout in training either
    prompts.use_prefix_attention(ours.train(), attention_dropout=False)
    torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, hf_eval, atol=1e-6, rtol=1e-6)


def test_attention_dropout_config_reaches_the_attention_modules():
    off = TransferModel(tiny_backbone(), config("prompts.length=0", "injection.length=2"))
    on = TransferModel(tiny_backbone(), config("prompts.length=0", "injection.length=2", "model.attention_dropout=true"))
    flag = prompts.ATTENTION_DROPOUT_FLAG
    assert not any(getattr(m, flag) for m in off.backbone.modules())
    assert all(getattr(m, flag) for m in on.backbone.modules())
