"""Which backbone parameters train.

Strategies (config freezing.strategy):
  frozen             nothing in the backbone trains (prompts, head and adapters still do)
  top_k              the top k transformer layers plus what follows them (a final norm)
  bias_only          every bias (BitFit)
  layernorm          every LayerNorm / RMSNorm weight and bias
  embeddings_frozen  everything except the embedding modules
  gradual            starts frozen; one more layer from the top every `unfreeze_every` optimizer steps,
                     up to k layers (ULMFiT-style gradual unfreezing)

LoRA parameters (names containing "lora_") are never frozen by a strategy.

Gradual unfreezing and the optimizer: `GradualUnfreezer.step(step)` flips requires_grad on and returns
the names it just unfroze. The engine must then make the optimizer see them:
  * a plain torch optimizer or DeepSpeed ZeRO-0 client optimizer: `optimizer.add_param_group({"params": new})`;
  * ZeRO-1/2/3 flatten and partition the trainable set at initialisation and cannot grow it: save the
    trainable state (dsxfer.method.trainable.gather), rebuild the engine over the new trainable set,
    and load it back. Unfreezing events are rare (every `unfreeze_every` steps), so this costs little.
"""

from __future__ import annotations

import re

from torch import nn

from dsxfer.errors import ConfigError

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Transformer layer index a parameter name belongs to, or None (embeddings, final norm, ...)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def is_adapter(name: str) -> bool:
    return "lora_" in name


def _is_embedding(name: str) -> bool:
    return "embed" in name


def _norm_param_names(backbone: nn.Module) -> set[str]:
    names = set()
    for mod_name, module in backbone.named_modules():
        cls = type(module).__name__.lower()
        if "norm" in cls:
            for p_name, _ in module.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def _unfrozen_by(strategy: str, backbone: nn.Module, top_k: int, num_layers: int) -> set[str]:
    names = [n for n, _ in backbone.named_parameters()]
    if strategy in ("frozen", "gradual"):
        return set()
    if strategy == "top_k":
        if not 0 <= top_k <= num_layers:
            raise ConfigError(f"config value freezing.top_k={top_k} is invalid: this backbone has {num_layers} layers (use 0..{num_layers})")
        first = num_layers - top_k
        out = set()
        for n in names:
            layer = layer_of(n)
            if layer is not None and layer >= first:
                out.add(n)
            elif layer is None and not _is_embedding(n) and top_k > 0:
                out.add(n)  # the final norm after the last layer belongs to the top of the stack
        return out
    if strategy == "bias_only":
        return {n for n in names if n.endswith(".bias") or n == "bias"}
    if strategy == "layernorm":
        return _norm_param_names(backbone)
    if strategy == "embeddings_frozen":
        return {n for n in names if not _is_embedding(n)}
    raise ConfigError(f"unknown freezing strategy '{strategy}': expected frozen, top_k, bias_only, layernorm, embeddings_frozen or gradual")


def freeze_backbone(backbone: nn.Module, strategy: str, *, top_k: int = 2, unfreeze_every: int = 100,
                    num_layers: int | None = None) -> "GradualUnfreezer | None":
    """Apply a strategy in place; returns the GradualUnfreezer for strategy=gradual, else None."""
    num_layers = num_layers or backbone.config.num_hidden_layers
    keep = _unfrozen_by(strategy, backbone, top_k, num_layers)
    for name, param in backbone.named_parameters():
        param.requires_grad_(name in keep or is_adapter(name))
    if strategy == "gradual":
        if not 1 <= top_k <= num_layers:
            raise ConfigError(f"config value freezing.top_k={top_k} is invalid for gradual unfreezing: use 1..{num_layers}")
        if unfreeze_every <= 0:
            raise ConfigError(f"config value freezing.unfreeze_every={unfreeze_every} is invalid: must be > 0")
        return GradualUnfreezer(backbone, top_k, unfreeze_every, num_layers)
    return None


class GradualUnfreezer:
    """Unfreezes layer L-1 at step `every`, L-2 at 2*every, ... until `final_k` layers train."""

    def __init__(self, backbone: nn.Module, final_k: int, every: int, num_layers: int, prefix: str = ""):
        self.backbone = backbone
        self.final_k = final_k
        self.every = every
        self.num_layers = num_layers
        self.prefix = prefix  # the backbone's name inside the wrapping model, so names match the optimizer's
        self.unfrozen_layers = 0

    def step(self, step: int) -> list[str]:
        """Call after each optimizer step with the number of steps done; returns newly unfrozen names."""
        target = min(self.final_k, step // self.every)
        new = []
        while self.unfrozen_layers < target:
            layer = self.num_layers - 1 - self.unfrozen_layers
            for name, param in self.backbone.named_parameters():
                if layer_of(name) == layer and not param.requires_grad:
                    param.requires_grad_(True)
                    new.append(self.prefix + name)
            self.unfrozen_layers += 1
        return new


def trainable_summary(model: nn.Module) -> str:
    """'trainable parameters: N of M (P%)' plus one line per top-level module that trains."""
    def numel(p):  # ZeRO-3 partitioned parameters report their full size in ds_numel
        return getattr(p, "ds_numel", p.numel())

    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    lines = [f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.4f}%)"]
    for name, child in model.named_children():
        n = sum(numel(p) for p in child.parameters() if p.requires_grad)
        if n:
            lines.append(f"  {name}: {n:,}")
    return "\n".join(lines)
