"""How dsxfer's Triton kernels are launched: compiled or interpreted, and with which block sizes.

Interpreter or compiler is chosen per launch from the tensors' device: CPU tensors (or
TRITON_INTERPRET=1) -> an InterpretedFunction built from the kernel's Python source, CUDA tensors ->
a JITFunction. The interpreter still needs TRITON_INTERPRET=1 in the environment before triton is first
imported, because Triton decorates its own library functions (tl.sum, tl.max, ...) at import; without it
a CPU launch raises a one-line error saying so (tests/conftest.py sets it on GPU-less machines). The
kernels call no other @triton.jit function of ours, so nothing else depends on import order.

Block sizes come from a short hand-tuned list per kernel (H100 first). Triton's autotuner does not run
under the interpreter, so tuning is opt-in: DSXFER_AUTOTUNE=1 on a CUDA device times every config of
the list once per shape key with triton.testing.do_bench and keeps the fastest.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

_WRAPPED: dict[tuple[int, bool], Any] = {}
_TUNED: dict[tuple, dict] = {}


def interpreting(device: torch.device) -> bool:
    """True when kernels on `device` must run in Triton's CPU interpreter."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel(fn: Callable, device: torch.device):
    """The launchable form of kernel source `fn` for tensors on `device` (cached)."""
    interp = interpreting(device)
    key = (id(fn), interp)
    if key not in _WRAPPED:
        if interp:
            import triton.language.standard as tl_standard
            from triton.runtime.interpreter import InterpretedFunction

            if not isinstance(tl_standard.sum, InterpretedFunction):
                raise RuntimeError("Triton kernels on CPU tensors run in Triton's interpreter, which needs "
                                   "TRITON_INTERPRET=1 set before triton is first imported; set it in the "
                                   "environment (or use CUDA tensors, or DSXFER_KERNELS=reference)")

            _WRAPPED[key] = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            _WRAPPED[key] = JITFunction(fn)
    return _WRAPPED[key]


def pick_config(name: str, key: tuple, configs: Sequence[dict], device: torch.device,
                launch: Callable[[dict], None], interpreter_config: dict) -> dict:
    """Block sizes for one launch.

    Interpreter: `interpreter_config` (large blocks mean fewer numpy steps). CUDA: the first entry of
    `configs` unless DSXFER_AUTOTUNE=1, then the fastest entry for this (name, key), measured once.
    `launch(config)` must run the kernel with that config and have no effect that a rerun would change.
    """
    if interpreting(device):
        return interpreter_config
    if os.environ.get("DSXFER_AUTOTUNE", "0") in ("", "0") or len(configs) == 1:
        return configs[0]
    cache_key = (name, key)
    if cache_key not in _TUNED:
        from triton.testing import do_bench

        timings = []
        for config in configs:
            try:
                timings.append((do_bench(lambda: launch(config), warmup=5, rep=20), config))
            except Exception:  # a config that exceeds shared memory or registers on this card
                continue
        if not timings:
            raise RuntimeError(f"no block configuration of {name} could be launched for shape key {key}")
        _TUNED[cache_key] = min(timings, key=lambda tc: tc[0])[1]
    return _TUNED[cache_key]


def launch_options(config: dict) -> dict:
    """The num_warps/num_stages part of a config (the interpreter ignores them)."""
    return {k: config[k] for k in ("num_warps", "num_stages") if k in config}


def blocks(config: dict) -> dict:
    """The constexpr block-size part of a config."""
    return {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
