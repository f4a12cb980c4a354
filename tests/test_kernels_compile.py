"""Every Triton kernel compiles to sm_90 (H100) machine code on this GPU-less machine.

The interpreter runs kernels as numpy and accepts things the GPU compiler rejects (layouts, dot shapes,
dtype mixes, shared-memory overflow). Here each kernel goes through triton.compile with
GPUTarget("cuda", 90, 32) and an ASTSource (signature + constexprs): Triton's own frontend, MLIR passes,
LLVM to PTX, then the ptxas bundled with Triton to a cubin (for sm_90 Triton 3.9 uses
triton/backends/nvidia/bin/ptxas-blackwell, CUDA 13.4; the plain `ptxas` beside it is CUDA 12.8 and
rejects the PTX 9.4 that Triton emits). Nothing in that chain needs a GPU or a CUDA driver. The block sizes and warp counts are the H100 defaults the
dispatch uses, so shared memory is checked against the H100's per-block limit as well.

Triton fixes interpreter-or-compiler when it is first imported (its own tl.sum, tl.max... are decorated
then), and tests/conftest.py switches the interpreter on for the pytest process on GPU-less machines.
So the compilation runs in one subprocess per set of kernels, started without TRITON_INTERPRET
(`python tests/test_kernels_compile.py lean|full` runs the same worker by hand and prints its JSON);
each test then checks its kernel's entry. A fresh TRITON_CACHE_DIR makes every run really compile.
The lean default set covers each kernel in its most constrained variant and each dtype for the attention
kernels; the full dtype x variant grid is @slow.
"""

import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from dsxfer.kernels.alignment_loss import (GRAD_CONFIGS, INFONCE_BWD_CONFIGS, INFONCE_CONFIGS, POOL_CONFIGS,
                                           _grad_kernel, _infonce_bwd_kernel, _infonce_fwd_kernel, _pool_kernel)
from dsxfer.kernels.prefix_attention import (DELTA_BLOCK_M, DKDV_CONFIGS, DQ_CONFIGS, FWD_CONFIGS,
                                             _attn_bwd_delta_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel,
                                             _attn_fwd_kernel)

H100_SHARED_PER_BLOCK = 227 * 1024
# Register spills the default block sizes may cost per thread (ptxas -v "bytes spill stores"); the
# defaults were chosen as the largest tiles without (or with negligible) spills at head dim 128 / H 1024.
MAX_SPILL_BYTES = 64
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
FLOAT_ARGS = {"qk_scale", "sm_scale", "coef"}


def compile_for_h100(fn, pointers: dict[str, str], constexprs: dict, config: dict):
    """Compile kernel source `fn` for sm_90; pointer args typed by `pointers`, other ints i32."""
    config = dict(config)
    options = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    constexprs = {**constexprs, **config}
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    missing = set(pointers) - set(names)
    assert not missing, f"unknown pointer arguments {missing}"
    # Pointers 16-byte aligned, as torch allocations are: lets the compiler vectorise loads.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers}
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = triton.runtime.jit.JITFunction(fn)
    compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options=options)
    assert compiled.asm.get("ptx"), "no PTX produced"
    assert len(compiled.asm.get("cubin", b"")) > 0, "no cubin produced"
    assert ".target sm_90" in compiled.asm["ptx"]
    assert compiled.metadata.shared <= H100_SHARED_PER_BLOCK, (
        f"{fn.__name__} needs {compiled.metadata.shared} B of shared memory, more than an H100 block has")
    return compiled


def spill_bytes(compiled) -> int:
    """Spill stores per thread, from the ptxas Triton itself uses for sm_90 (ptxas -v on the PTX)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = compiled.asm["ptx"]
    arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(90).path, f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


def attention_kernels(dtype, causal=True, kpm=True):
    """(name, fn, pointer types, constexprs, config) for the four attention kernels in one dtype."""
    t = "*" + TRITON_TYPE[dtype]
    split = dtype != torch.float32  # the default (exact) backward for 16-bit inputs
    common = dict(HEAD_DIM=128, BLOCK_D=128, CAUSAL=causal, HAS_KPM=kpm,
                  PRECISION="tf32x3" if dtype == torch.float32 else "ieee")
    io = dict(Q=t, K=t, V=t, PK=t, PV=t, KPM="*i8", O=t, O_LO=t, LSE="*fp32")
    size = dtype.itemsize
    yield "attn_fwd", _attn_fwd_kernel, io, {**common, "STORE_LO": split}, FWD_CONFIGS[size][0]
    yield ("attn_bwd_delta", _attn_bwd_delta_kernel, dict(O=t, O_LO=t, DO=t, DELTA="*fp32"),
           dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=DELTA_BLOCK_M, HAS_LO=split), {})
    common["SPLIT"] = split
    for prefix in (False, True):
        grads = "*fp32" if prefix else t  # prefix partials are float32
        yield (f"attn_bwd_dkdv_prefix={prefix}", _attn_bwd_dkdv_kernel,
               dict(Q=t, K=t, V=t, DO=t, LSE="*fp32", DELTA="*fp32", KPM="*i8", DK=grads, DV=grads),
               {**common, "IS_PREFIX": prefix}, DKDV_CONFIGS[size][0])
    yield ("attn_bwd_dq", _attn_bwd_dq_kernel,
           dict(Q=t, K=t, V=t, PK=t, PV=t, DO=t, LSE="*fp32", DELTA="*fp32", KPM="*i8", DQ=t), common, DQ_CONFIGS[size][0])


def alignment_kernels(dtype, loss_kind=2, H=1024):
    t = "*" + TRITON_TYPE[dtype]
    f = "*fp32"
    yield ("pool", _pool_kernel,
           dict(hidden_ptr=t, mask_ptr=f, teacher_ptr=f, pooled_ptr=f, teacher_out_ptr=f, rnorm_ptr=f, count_ptr=f,
                row_ptr=f), dict(LOSS=loss_kind, BLOCK_H=H), POOL_CONFIGS[0])
    yield ("grad", _grad_kernel,
           dict(grad_loss_ptr=f, mask_ptr=f, pooled_ptr=f, teacher_ptr=f, teacher_out_ptr=f, acc_ptr=f, rnorm_ptr=f,
                count_ptr=f, dh_ptr=t), dict(LOSS=loss_kind, BLOCK_H=H), GRAD_CONFIGS[0])
    if loss_kind == 2:
        yield ("infonce_fwd", _infonce_fwd_kernel, dict(s_ptr=f, t_ptr=f, lse_ptr=f), dict(PRECISION="tf32x3"),
               INFONCE_CONFIGS[0])
        yield ("infonce_bwd", _infonce_bwd_kernel, dict(s_ptr=f, t_ptr=f, lse_ptr=f, acc_ptr=f),
               dict(PRECISION="tf32x3"), INFONCE_BWD_CONFIGS[0])


def _lean():
    """The default set: each attention kernel in bf16 (causal, padded: the most constrained variant), the
    float32 forward (the largest tiles), and the four alignment-loss kernels."""
    for item in attention_kernels(torch.bfloat16):
        if item[0] in ("attn_fwd", "attn_bwd_dkdv_prefix=False", "attn_bwd_dq"):
            yield ("bf16",) + item
    yield ("fp32",) + next(attention_kernels(torch.float32))
    for item in alignment_kernels(torch.bfloat16):
        yield ("bf16",) + item


LEAN = list(_lean())


def _case_id(item) -> str:
    return f"{item[0]}-{item[1]}"


def _worker(which: str) -> dict:
    """Compile every kernel of LEAN or FULL in this process (TRITON_INTERPRET must be off)."""
    results = {}
    for item in LEAN if which == "lean" else FULL:
        variant, name, fn, pointers, constexprs, config = item
        try:
            compiled = compile_for_h100(fn, pointers, constexprs, config)
            spills = spill_bytes(compiled) if which == "lean" else None
            results[_case_id(item)] = dict(ok=True, spills=spills, shared=compiled.metadata.shared)
        except Exception as e:  # reported per kernel by the tests
            results[_case_id(item)] = dict(ok=False, error=f"{type(e).__name__}: {e}"[-2000:])
    return results


@functools.lru_cache(maxsize=None)
def _compiled(which: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        run = subprocess.run([sys.executable, __file__, which], capture_output=True, text=True, env=env,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, f"compile worker failed:\n{run.stderr[-3000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("item", LEAN, ids=[_case_id(item) for item in LEAN])
def test_kernel_compiles_for_sm90(item):
    result = _compiled("lean")[_case_id(item)]
    assert result["ok"], result.get("error")
    if item[0] == "fp32":
        return  # the float32 attention path trades registers for tf32x3 accuracy and spills at head dim 128
    assert result["spills"] <= MAX_SPILL_BYTES, f"{_case_id(item)} ({item[-1]}) spills {result['spills']} B per thread"


def _full_grid():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for causal in (False, True):
            for kpm in (False, True):
                for item in attention_kernels(dtype, causal, kpm):
                    yield (f"{TRITON_TYPE[dtype]}-causal={causal}-kpm={kpm}",) + item
        for loss_kind in (0, 1, 2):
            for item in alignment_kernels(dtype, loss_kind):
                yield (f"{TRITON_TYPE[dtype]}-loss={loss_kind}",) + item


FULL = list(_full_grid())


@pytest.mark.slow
@pytest.mark.parametrize("item", FULL, ids=[_case_id(item) for item in FULL])
def test_every_variant_compiles_for_sm90(item):
    result = _compiled("full")[_case_id(item)]
    assert result["ok"], result.get("error")


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1] if len(sys.argv) > 1 else "lean")))
