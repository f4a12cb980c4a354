"""Tiny randomly initialised backbones of every supported architecture, built straight from HF configs.

Shared by the prompt and model tests: vocabulary 120, hidden 32, 2 layers, 4 heads (2 key/value heads
for the decoders, so grouped-query attention is exercised).
"""

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model, XLMRobertaConfig, XLMRobertaModel

from dsxfer.config import load_config


def tiny_backbone(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if arch == "xlm-roberta":
        return XLMRobertaModel(XLMRobertaConfig(**common, max_position_embeddings=80, pad_token_id=1))
    if arch == "bert":
        return BertModel(BertConfig(**common, max_position_embeddings=80))
    if arch == "llama":
        return LlamaModel(LlamaConfig(**common, num_key_value_heads=2))
    return Qwen2Model(Qwen2Config(**common, num_key_value_heads=2))


def config(*overrides):
    return load_config(None, ["model.max_length=64", "model.doc_stride=16", "alignment.enabled=false", *overrides])
