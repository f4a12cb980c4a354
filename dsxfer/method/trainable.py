"""The trainable state of a TransferModel: the one place that gathers, checks, saves and loads it.

Trainable means every parameter with requires_grad: prompts, prefixes, head, adapters, unfrozen backbone
parts. The frozen backbone is never part of it; a run folder stores only these values.

- `gather(module)`: full-valued CPU copies, ZeRO-3 shards gathered (every rank calls it).
- `save(module, run_dir)`: gather, refuse NaN/Inf (NonFiniteError), and on rank 0 write
  <run_dir>/trainable.safetensors through a temporary file and an atomic rename (a crash never leaves a
  half-written file), plus the soft prompt alone (soft_prompt.safetensors) for composition in later runs.
- `read(path)` / `load(module, state)`: values back into the parameters, writing through ZeRO-3
  partitions; every mismatch (unknown, missing or misshapen tensor, unreadable file) is a DataError.

Model (`TransferModel.save_trainable`, `load_trained`), training (the run's result, checkpoints) and
export all go through here; `TRAINABLE_FILE` is the one name of the file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from dsxfer.errors import DataError, DsxferError

TRAINABLE_FILE = "trainable.safetensors"
PROMPT_FILE = "soft_prompt.safetensors"
PROMPT_KEY = "prompt.parts.trainable.embeddings"  # the trained soft prompt inside the trainable state


class NonFiniteError(DsxferError):
    """Trainable values that are NaN or infinite: never saved."""


def parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter with requires_grad, in module order."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")  # a ZeRO-3 parameter: each rank holds a shard, p itself is empty


def _gathered(params: list[torch.Tensor], *, modifier_rank: int | None = None):
    """Full values of the ZeRO-3 partitioned ones among `params` for the duration (a no-op without any)."""
    partitioned = [p for p in params if _is_partitioned(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


def gather(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full-valued CPU copies of every trainable parameter, ZeRO-3 shards gathered (all ranks call it)."""
    named = parameters(module)
    with _gathered([p for _, p in named]):
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named}


def check_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise NonFiniteError naming the first tensor of `state` that holds a NaN or an infinity."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteError(f"{what}: {len(bad)} trainable tensor(s) hold NaN/Inf values (first: {bad[0]}); "
                             "refusing to write them")


def write(state: dict[str, torch.Tensor], path: str | Path, *, metadata: dict[str, str] | None = None) -> Path:
    """Write `state` to `path` as safetensors through `.<name>.tmp` and an atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def save(module: nn.Module, run_dir: str | Path, *, run_name: str = "") -> Path:
    """<run_dir>/trainable.safetensors (+ soft_prompt.safetensors when a prompt trains) with gathered values.

    Every rank calls it (the ZeRO-3 gather); rank 0 writes. NaN/Inf values raise NonFiniteError, nothing written.
    """
    run_dir = Path(run_dir)
    path = run_dir / TRAINABLE_FILE
    state = gather(module)
    check_finite(state, str(path))
    if _rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write(state, path)
        if PROMPT_KEY in state:  # the prompt alone, for composition in later runs (prompts.task_prompt / language_prompt)
            from dsxfer.method.prompts import SoftPrompt

            prompt = state[PROMPT_KEY]
            SoftPrompt(prompt.shape[0], prompt.shape[1], prompt).save(run_dir / PROMPT_FILE, run=run_name)
    return path


def read(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a trainable-state file; a missing or unreadable file is a DataError naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataError(f"trainable state {path} not found: give the output_dir of a finished training run")
    try:
        return load_file(str(path))
    except Exception as e:  # a truncated or foreign file
        raise DataError(f"trainable state {path} cannot be read as safetensors ({e}): the file is damaged") from None


def load(module: nn.Module, state: dict[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Copy `state` into the module's parameters, writing through ZeRO-3 partitions (all ranks call it).

    Every trainable parameter must be in `state`; a tensor may also name a parameter that is frozen now
    (gradual unfreezing had opened it). Unknown, missing or misshapen tensors raise DataError.
    """
    params = dict(module.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise DataError(f"{source}: {len(unknown)} tensors do not belong to this model (first: {unknown[0]}); "
                        "was it trained with another config or backbone?")
    absent = sorted({n for n, _ in parameters(module)} - set(state))
    if absent:
        raise DataError(f"{source}: trainable tensor {absent[0]} is missing ({len(absent)} in all); the file is incomplete")
    targets = [(n, params[n]) for n in state]
    with _gathered([p for _, p in targets], modifier_rank=0), torch.no_grad():
        for name, p in targets:
            if tuple(p.shape) != tuple(state[name].shape):
                raise DataError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, the model expects {tuple(p.shape)}")
            p.copy_(state[name].to(p.dtype))
