"""Model FLOPs per trained token: what a step really computes, for the MFU line of the training log.

A matrix of p parameters applied to one token costs 2p FLOPs forward. Backward has two parts:
the input gradients (2p per matrix the gradient must pass through) and the weight gradients (2p per
trainable matrix). With a frozen backbone most of the 6p of full fine-tuning is never computed:

  forward          2 x (parameters of the layers that run + the head)
                   the layers that run: all of them, or only layers L.. when the activation cache serves
                   the states entering layer L
  input gradients  2 x (parameters of the layers from the lowest trainable or prompted one up + the head)
                   below that layer nothing needs a gradient, so backward stops there
  weight gradients 2 x trainable parameters applied per token (LoRA, unfrozen layers, the head); the
                   prefixes and soft prompts are not per-token matrices and are left out

Embedding tables are looked up, not multiplied, and are not counted (as in nanoGPT); neither is the
attention's score computation (T^2 terms), so at long sequences MFU is understated a little.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn


def flops_per_token(layer_params: Sequence[int], head_params: int, *, first_run: int, first_backward: int,
                    trainable_params: int) -> int:
    """FLOPs of one trained token (see the module docstring).

    layer_params: parameters of each backbone layer (bottom first); head_params: parameters above the
    last layer (head, final norm); first_run: the first layer that runs (0 without the cache);
    first_backward: the lowest trainable or prompted layer (len(layer_params) when only the head trains);
    trainable_params: trainable parameters applied per token.
    """
    forward = 2 * (sum(layer_params[first_run:]) + head_params)
    input_grads = 2 * (sum(layer_params[first_backward:]) + head_params)
    weight_grads = 2 * trainable_params
    return forward + input_grads + weight_grads


def _numel(p) -> int:
    return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitioned parameters keep their full size here


def model_flops_per_token(model: Any) -> tuple[int, str]:
    """(FLOPs per token, how they were counted) for a TransferModel."""
    from dsxfer.method.freezing import layer_of

    layers = [0] * model.num_layers
    above = 0
    for name, p in model.backbone.named_parameters():
        if "embed" in name:
            continue
        index = layer_of(name)
        if index is None:
            above += _numel(p)
        else:
            layers[index] += _numel(p)
    head = above + sum(_numel(p) for p in model.head.parameters())
    cache = getattr(model, "activation_cache", None)
    first_run = cache.start if cache is not None else 0
    first_backward = getattr(model, "first_open_layer", 0)
    skip = (model.injection, model.prompt)
    not_per_token = {id(p) for m in skip if isinstance(m, nn.Module) for p in m.parameters()}
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad and id(p) not in not_per_token)
    total = flops_per_token(layers, head, first_run=first_run, first_backward=first_backward, trainable_params=trainable)
    how = (f"MFU counts {total:,} FLOPs per token: forward through layers {first_run}..{model.num_layers - 1} + head, "
           f"input gradients through layers {first_backward}..{model.num_layers - 1} + head, weight gradients of "
           f"{trainable:,} trainable per-token parameters")
    return total, how
