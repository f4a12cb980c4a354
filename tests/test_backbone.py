"""Backbone loading: tiny encoders and decoders, local folders, the embedded default, bad paths."""

from __future__ import annotations

import pytest
import torch

from dsxfer.errors import ConfigError, DsxferError
from dsxfer.method.backbone import load_backbone, load_tokenizer
from tiny import ARCHS, tiny_backbone_and_tokenizer, trained_tokenizer_json

TEXTS = ["Tom wasn't sure what to do.", "Ich weiß nicht, wo Maria ist."]
DECODERS = ("llama", "qwen2")


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_forward_shapes(arch):
    model, tokenizer = tiny_backbone_and_tokenizer(arch)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], model.config.hidden_size)
    assert torch.isfinite(hidden).all()
    assert model.config._attn_implementation == "eager"
    assert model.config.num_hidden_layers == 2 and model.config.num_attention_heads == 4
    assert 32 <= model.config.hidden_size <= 64
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id < model.config.vocab_size
    assert 500 <= len(tokenizer) <= 1000 == model.config.vocab_size
    if arch in DECODERS:
        assert model.config.num_key_value_heads == 2  # grouped-query attention: 2 heads share each K/V head
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        assert model.layers[0].self_attn.k_proj.out_features == 2 * head_dim


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_tokenizer_offsets_point_into_the_text(arch):
    _, tokenizer = tiny_backbone_and_tokenizer(arch)
    question, context = "Where is Maria?", "Maria ist in der Küche, sagte Tom."
    enc = tokenizer(question, context, return_offsets_mapping=True)
    sequence_ids = enc.sequence_ids()
    assert {0, 1} <= set(s for s in sequence_ids if s is not None)
    rebuilt = []
    for token, seq, (start, end) in zip(enc.tokens(), sequence_ids, enc["offset_mapping"]):
        text = context if seq == 1 else question
        if seq is None:  # special tokens span nothing
            assert start == end
            continue
        assert 0 <= start < end <= len(text)
        if seq == 1:
            rebuilt.append((start, end))
    # context tokens cover the context left to right, and "Küche" is reachable through them
    assert rebuilt == sorted(rebuilt)
    k = context.index("Küche")
    assert any(start <= k < end for start, end in rebuilt)
    assert any(start < k + 5 <= end for start, end in rebuilt)


def test_special_tokens_follow_each_architecture():
    cases = {
        "xlm-roberta": ("<s>", "</s>", "<pad>"), "bert": ("[CLS]", "[SEP]", "[PAD]"),
        "llama": ("<s>", None, "</s>"), "qwen2": (None, None, "<|endoftext|>"),
    }
    for arch, (first, last, pad) in cases.items():
        _, tokenizer = tiny_backbone_and_tokenizer(arch)
        tokens = tokenizer.convert_ids_to_tokens(tokenizer("hello world")["input_ids"])
        assert tokenizer.pad_token == pad, arch
        assert (tokens[0] == first) if first else tokens[0] not in tokenizer.all_special_tokens, (arch, tokens)
        assert (tokens[-1] == last) if last else tokens[-1] not in tokenizer.all_special_tokens, (arch, tokens)
    _, bert = tiny_backbone_and_tokenizer("bert")
    assert set(bert("a", "b")["token_type_ids"]) == {0, 1}  # BERT marks the second segment


def test_tiny_model_is_deterministic_and_overridable():
    first, tok_a = tiny_backbone_and_tokenizer("qwen2")
    trained_tokenizer_json.cache_clear()  # retrain the tokenizer from scratch too
    second, tok_b = tiny_backbone_and_tokenizer("qwen2")
    assert tok_a.get_vocab() == tok_b.get_vocab()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    other, _ = tiny_backbone_and_tokenizer("qwen2", seed=1)
    assert not torch.equal(other.embed_tokens.weight, first.embed_tokens.weight)
    deeper, _ = tiny_backbone_and_tokenizer("llama", num_hidden_layers=4, hidden_size=64)
    assert len(deeper.layers) == 4 and deeper.config.hidden_size == 64
    with pytest.raises(ConfigError, match="no field 'hidden_sise'"):
        tiny_backbone_and_tokenizer("bert", hidden_sise=64)
    with pytest.raises(ConfigError, match="gpt2"):
        tiny_backbone_and_tokenizer("gpt2")


@pytest.mark.parametrize("arch", ["xlm-roberta", "llama"])
def test_local_folder_round_trip(arch, tmp_path):
    model, tokenizer = tiny_backbone_and_tokenizer(arch)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path), task="classification", num_labels=3)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config.num_labels == 3 and loaded.config._attn_implementation == "eager"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    reloaded = load_tokenizer(tmp_path)
    assert reloaded(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    assert reloaded.pad_token_id == tokenizer.pad_token_id
    half = load_backbone(tmp_path, dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_embedded_default_loads_as_xlm_roberta(embedded_path):
    model = load_backbone(None, task="qa")
    assert type(model).__name__ == "XLMRobertaModel" and model.pooler is None
    assert model.config.num_hidden_layers == 12 and model.config._attn_implementation == "eager"
    tokenizer = load_tokenizer(None)
    assert tokenizer.is_fast and len(tokenizer) == 250002 and tokenizer.pad_token_id == model.config.pad_token_id
    enc = tokenizer("Wo ist Maria?", "Maria ist in der Küche.", return_offsets_mapping=True)
    assert enc.tokens()[:2] == ["<s>", "\u2581Wo"] and enc.tokens()[-1] == "</s>"
    assert "token_type_ids" not in enc  # XLM-R has no segment embeddings to feed


def test_missing_folder_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(DsxferError) as caught:
        load_backbone(str(missing))
    message = str(caught.value)
    assert "\n" not in message and str(missing) in message and "does not exist" in message
    with pytest.raises(DsxferError, match="does not exist"):
        load_tokenizer(str(missing))
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(DsxferError, match="has no config.json"):
        load_backbone(str(tmp_path / "not-a-model"))
    with pytest.raises(ConfigError, match="model.task"):
        load_backbone(str(missing), task="ner")


def test_cli_reports_a_missing_model_with_exit_code_2(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "no-such-model"
    result = subprocess.run([sys.executable, "-m", "dsxfer.cli", "prepare-model", "--model", str(missing)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsxfer: error: model folder") and str(missing) in lines[0]


def test_cli_prepare_model_summarises_a_local_model(tmp_path, capsys):
    from dsxfer.cli import main

    model, tokenizer = tiny_backbone_and_tokenizer("bert")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["prepare-model", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "BertModel" in out and "2 layers" in out and "hidden size 32" in out


def test_broken_local_folder_is_one_clear_error(tmp_path):
    model, tokenizer = tiny_backbone_and_tokenizer("bert")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted save
    with pytest.raises(DsxferError, match="cannot load the model folder") as caught:
        load_backbone(tmp_path)
    assert "\n" not in str(caught.value)
