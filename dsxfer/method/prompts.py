"""Soft prompts (input level) and prompt injection (per-layer prefix keys/values).

SoftPrompt: `n` trainable virtual-token embeddings prepended to the input embeddings. Several can be
composed at inference: a task prompt (learned on source-language task data) followed by a language
prompt (learned with the alignment loss), each saved to and loaded from its own safetensors file.

PromptInjection: trainable prefix keys and values for chosen layers. It works through transformers'
AttentionInterface: `attach` registers one attention function under ATTN_IMPLEMENTATION and points the
backbone's config at it, so every self-attention module (XLM-R, BERT, Llama, Qwen2, ...) calls us with
its own `layer_idx`. The function translates whatever mask transformers built into the kernel's form
(a (B, T) key padding mask + a causal flag; a general 4D boolean mask only as a fallback) and runs
`dsxfer.kernels.prefix_attention`. Layers without a prefix go through the same function with P = 0.
Prefix keys are used as they are (no rotary embedding): they live directly in the rotated key space.
The kernel applies no attention-probability dropout unless the model asks for it (model.attention_dropout:
`use_prefix_attention(..., attention_dropout=True)`); the backbone's other dropouts are unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from dsxfer.errors import ConfigError, DataError

ATTN_IMPLEMENTATION = "dsxfer_prefix"
ATTENTION_DROPOUT_FLAG = "dsxfer_attention_dropout"  # set on the backbone's modules by use_prefix_attention

# The prefixes of the forward pass in progress, per thread. A plain module attribute would do, but the
# backbone's attention modules are called from inside its own forward, so the injection computes its
# (possibly MLP-reparameterised) prefixes once per forward and publishes them here.
_active = threading.local()


# ------------------------------------------------------------------------------- soft prompts


def _gathered(param: torch.Tensor):
    """Context in which a ZeRO-3 partitioned parameter holds its full value (a no-op otherwise)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def vocabulary_init(embedding: nn.Embedding, n: int, *, token_ids: list[int] | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """n rows copied from the word-embedding matrix: the given token ids (repeated to length n), or random ones.

    Random ids skip the first few rows, where the special tokens of every vocabulary we load sit.
    """
    weight = embedding.weight
    with _gathered(weight):
        vocab = weight.shape[0]
        if token_ids:
            ids = torch.tensor([token_ids[i % len(token_ids)] for i in range(n)], dtype=torch.long)
        else:
            low = min(4, vocab - 1)  # skip special tokens, which sit at the start of every vocabulary we load
            ids = torch.randint(low, vocab, (n,), generator=generator)
        return weight.detach()[ids.to(weight.device)].clone().float()


class SoftPrompt(nn.Module):
    """n virtual-token embeddings of width hidden, prepended to the inputs embeddings."""

    def __init__(self, n: int, hidden: int, init: torch.Tensor | None = None, *, std: float = 0.02):
        super().__init__()
        if init is not None and tuple(init.shape) != (n, hidden):
            raise ValueError(f"soft prompt init has shape {tuple(init.shape)}, expected ({n}, {hidden})")
        value = init.clone() if init is not None else torch.randn(n, hidden) * std
        self.embeddings = nn.Parameter(value.float())

    @property
    def length(self) -> int:
        return self.embeddings.shape[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        """(B, n, H): the prompt for every row of the batch."""
        return self.embeddings.unsqueeze(0).expand(batch_size, -1, -1)

    def save(self, path: str | Path, **metadata: str) -> None:
        from safetensors.torch import save_file

        with _gathered(self.embeddings):
            save_file({"embeddings": self.embeddings.detach().float().cpu().contiguous()}, str(path),
                      metadata={"kind": "dsxfer-soft-prompt", **{k: str(v) for k, v in metadata.items()}})

    @classmethod
    def load(cls, path: str | Path, hidden: int, *, trainable: bool = False) -> "SoftPrompt":
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise DataError(f"prompt file not found: {p} (give a file written by a previous run, e.g. <run_dir>/soft_prompt.safetensors)")
        try:
            with safe_open(str(p), framework="pt") as f:
                if "embeddings" not in f.keys():
                    raise DataError(f"prompt file {p} has no 'embeddings' tensor: it is not a dsxfer soft prompt")
                emb = f.get_tensor("embeddings")
        except DataError:
            raise
        except Exception as e:  # a truncated or foreign file
            raise DataError(f"prompt file {p} cannot be read as safetensors: {e}") from None
        if emb.dim() != 2 or emb.shape[1] != hidden:
            raise DataError(
                f"prompt file {p}: embeddings have shape {tuple(emb.shape)}, but this backbone needs width {hidden} "
                "(was the prompt trained on another model?)")
        prompt = cls(emb.shape[0], hidden, emb)
        prompt.embeddings.requires_grad_(trainable)
        return prompt


class ComposedPrompt(nn.Module):
    """Task prompt, then language prompt, then the trainable prompt; any of them may be absent."""

    def __init__(self, parts: dict[str, SoftPrompt]):
        super().__init__()
        self.parts = nn.ModuleDict({k: v for k, v in parts.items() if v is not None and v.length > 0})

    @property
    def length(self) -> int:
        return sum(p.length for p in self.parts.values())

    def forward(self, batch_size: int) -> torch.Tensor:
        return torch.cat([p(batch_size) for p in self.parts.values()], dim=1)


# --------------------------------------------------------------------------- prompt injection


def resolve_layers(spec, num_layers: int, top_k: int, what: str = "injection.layers") -> list[int]:
    """'all' | 'top_k' | [indices] -> sorted non-negative layer indices; out-of-range indices are a ConfigError."""
    if spec == "all":
        return list(range(num_layers))
    if spec == "top_k":
        if not 1 <= top_k <= num_layers:
            raise ConfigError(f"config value injection.top_k={top_k} is invalid: this backbone has {num_layers} layers (use 1..{num_layers})")
        return list(range(num_layers - top_k, num_layers))
    out = []
    for i in spec:
        if not -num_layers <= i < num_layers:
            raise ConfigError(
                f"config value {what}={list(spec)} is invalid: layer {i} does not exist, this backbone has "
                f"{num_layers} layers (use 0..{num_layers - 1}, or negative indices from the top)")
        out.append(i % num_layers)
    return sorted(set(out))


def _attention_geometry(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


class PromptInjection(nn.Module):
    """Trainable prefix keys/values (Hkv, P, D) for each chosen layer.

    Without reparameterisation each layer owns two parameters. With it, P learned seed vectors pass
    through a small MLP (Linear -> tanh -> Linear) that emits every chosen layer's keys and values at
    once, which trains more stably; `merged()` evaluates it once so the MLP can be dropped at export.
    """

    def __init__(self, config, length: int, layers: list[int], *, reparam: bool = False, reparam_hidden: int = 128,
                 std: float = 0.02):
        super().__init__()
        self.length = length
        self.layers = list(layers)
        self.num_layers = config.num_hidden_layers
        _, self.kv_heads, self.head_dim = _attention_geometry(config)
        self.reparam = reparam
        shape = (self.kv_heads, length, self.head_dim)
        if reparam:
            out = len(self.layers) * 2 * self.kv_heads * self.head_dim
            self.seed = nn.Parameter(torch.randn(length, reparam_hidden) * std)
            self.mlp = nn.Sequential(nn.Linear(reparam_hidden, reparam_hidden), nn.Tanh(), nn.Linear(reparam_hidden, out))
        else:
            self.keys = nn.ParameterDict({str(i): nn.Parameter(torch.randn(shape) * std) for i in self.layers})
            self.values = nn.ParameterDict({str(i): nn.Parameter(torch.randn(shape) * std) for i in self.layers})

    def forward(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """str(layer index) -> (prefix_k, prefix_v), each (Hkv, P, D).

        String keys: DeepSpeed ZeRO-3's post-forward hook walks a dict output and expects string keys.
        """
        if not self.reparam:
            return {str(i): (self.keys[str(i)], self.values[str(i)]) for i in self.layers}
        flat = self.mlp(self.seed)  # (P, L * 2 * Hkv * D)
        kv = flat.view(self.length, len(self.layers), 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        return {str(layer): (kv[j, 0], kv[j, 1]) for j, layer in enumerate(self.layers)}

    def merged(self) -> dict[str, torch.Tensor]:
        """Plain per-layer prefixes (what export writes); equal to forward() for both parameterisations."""
        with torch.no_grad():
            out = {}
            for i, (k, v) in self.forward().items():
                out[f"prefix.{i}.key"] = k.detach().float().cpu().contiguous()
                out[f"prefix.{i}.value"] = v.detach().float().cpu().contiguous()
            return out


@contextlib.contextmanager
def active_prefixes(prefixes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> Iterator[None]:
    """Make `prefixes` visible to the registered attention function for the forward inside the block."""
    previous = getattr(_active, "prefixes", None)
    _active.prefixes = prefixes
    try:
        yield
    finally:
        _active.prefixes = previous


def _translate_mask(mask: torch.Tensor | None, batch: int, t_q: int, t_k: int):
    """HF mask -> (key_padding_mask (B, T) bool or None, attn_mask (B, 1|H, Tq, Tk) bool or None)."""
    if mask is None:
        return None, None
    if mask.dim() == 2:  # our own mask function's output: the padding mask
        return mask.bool(), None
    if mask.dtype != torch.bool:  # additive float mask: 0 = attend, large negative = masked
        mask = mask > torch.finfo(mask.dtype).min / 2
    return None, mask[..., :t_q, -t_k:]


def prefix_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs):
    """The function registered in AttentionInterface: HF calling convention in, (B, T, H, D) out."""
    from dsxfer.kernels import prefix_attention

    prefixes = getattr(_active, "prefixes", None) or {}
    layer = getattr(module, "layer_idx", None)
    prefix_k, prefix_v = prefixes.get(str(layer), (None, None))
    if prefix_k is not None:
        prefix_k = prefix_k.to(query.dtype)
        prefix_v = prefix_v.to(query.dtype)
    key_padding_mask, attn_mask = _translate_mask(attention_mask, query.shape[0], query.shape[2], key.shape[2])
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError("prompt injection supports full-sequence forwards (no KV cache / generation)")
    # With a 4D mask, causality is already inside it; otherwise the module says whether it is causal.
    causal = attn_mask is None and bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    # transformers passes the module's attention dropout rate in training and 0 in eval
    dropout_p = float(dropout) if getattr(module, ATTENTION_DROPOUT_FLAG, False) else 0.0
    out = prefix_attention(query, key, value, prefix_k, prefix_v, key_padding_mask=key_padding_mask,
                           causal=causal, scale=scaling, attn_mask=attn_mask, dropout_p=dropout_p)
    return out.transpose(1, 2).contiguous(), None


def _prefix_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask function registered in AttentionMaskInterface.

    For the plain causal and bidirectional patterns it returns the (B, T) padding mask (or None), which
    the kernel takes directly together with the module's causal flag; for anything else (sliding
    windows, packed sequences, caches) a materialised 4D boolean mask.
    """
    from transformers import masking_utils as mu

    plain = mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function, None)
    if plain and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        if attention_mask is None:
            return None
        padding = attention_mask[:, -kv_length:].bool()
        return None if bool(padding.all()) else padding
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return mu.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                        mask_function=mask_function or mu.causal_mask_function, attention_mask=attention_mask,
                        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


def register_attention() -> str:
    """Register the prefix attention and its mask function with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _prefix_mask)
    return ATTN_IMPLEMENTATION


def use_prefix_attention(backbone: nn.Module, *, attention_dropout: bool = False) -> None:
    """Point the backbone (and its sub-configs) at the registered prefix attention; with attention_dropout, its
    attention modules apply the attention-probability dropout rate transformers passes them in training."""
    register_attention()
    for module in backbone.modules():
        setattr(module, ATTENTION_DROPOUT_FLAG, bool(attention_dropout))
    if hasattr(backbone, "set_attn_implementation"):
        backbone.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        backbone.config._attn_implementation = ATTN_IMPLEMENTATION
    for module in backbone.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and cfg._attn_implementation != ATTN_IMPLEMENTATION:
            cfg._attn_implementation = ATTN_IMPLEMENTATION
