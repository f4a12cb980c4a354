"""Benchmark dsxfer's Triton kernels against PyTorch on one GPU; appends the table to docs/PERF.md.

    python bench/gpu_kernels.py            # CUDA: the goal shapes, ~3-5 minutes on an H100
    python bench/gpu_kernels.py --smoke    # CPU: tiny shapes, Triton interpreter; checks the script runs

What runs (forward + backward each, timed as one step, median of triton.testing.do_bench):
  alignment loss  InfoNCE, N=4096 pooled rows, T=128 tokens, H=1024, bf16 hidden, fp32 teacher cache:
                  eager reference | torch.compile(reference) | dsxfer Triton
  prefix attn     B=8, T=2048, P=64, 32 heads x 128, bf16, causal (prefix always visible):
                  eager reference | torch.compile(reference) | concat K/V + SDPA (lower-right causal bias,
                  so the FlashAttention backend can take it; the backend SDPA actually ran is read from
                  the profiler) | concat + FlexAttention (compiled) | dsxfer Triton (default exact
                  backward: P and dS as hi + lo 16-bit parts) | dsxfer Triton, fast backward
                  (DSXFER_ATTENTION_BACKWARD=fast: P and dS rounded once, as FlashAttention does)
Columns: median ms, speed-up vs eager and vs the named baseline, achieved TFLOP/s (attention: 3.5x the
forward matmul FLOPs, the usual fwd+bwd count; InfoNCE: the three N x N x H products) or GB/s
(alignment: the bytes that must move: read hidden once, write grad_hidden once) against the card's
roofline, peak memory of one step above the inputs, and max |output - eager output|.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PERF_MD = ROOT / "docs" / "PERF.md"

# Dense peak numbers from the vendors' data sheets: (bf16 TFLOP/s, tf32 TFLOP/s, HBM TB/s).
ROOFLINES = {
    "H100 SXM": (989.0, 494.0, 3.35),
    "H100 NVL": (835.0, 418.0, 3.9),
    "H100 PCIe": (756.0, 378.0, 2.0),
    "H100": (989.0, 494.0, 3.35),
    "H200": (989.0, 494.0, 4.8),
    "A100": (312.0, 156.0, 2.0),
}


def roofline(name: str):
    for key, value in ROOFLINES.items():
        if key in name:
            return value
    return None


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter); no PERF.md entry")
    p.add_argument("--no-write", action="store_true", help="print the table only, do not append to docs/PERF.md")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile / FlexAttention rows")
    return p.parse_args()


class Bench:
    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke

    def time_ms(self, step) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return do_bench(step, warmup=10, rep=50, return_mode="median")
        step()
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    def peak_mib(self, step):
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def sdpa_backend_used(step) -> str:
    """Which SDPA kernel ran, from the names of the kernels the profiler saw."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        step()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    for marker, backend in (("cudnn", "cuDNN"), ("flash", "FlashAttention"), ("efficient", "memory-efficient"),
                            ("fmha", "memory-efficient"), ("_scaled_dot_product_attention_math", "math")):
        if marker in names:
            return backend
    return "math"


def fwd_bwd(fn, inputs, grad_out=None, forward_only=False, env=None):
    """A step: forward, backward into `inputs` (with `env` set around both); returns the output."""

    def step():
        if env:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                return plain()
            finally:
                for k, v in saved.items():
                    os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        return plain()

    def plain():
        if forward_only:
            with torch.no_grad():
                return fn()
        for x in inputs:
            x.grad = None
        out = fn()
        out.backward(grad_out if out.dim() else None)
        return out

    return step


def alignment_rows(b: Bench, compile_backend):
    from dsxfer.kernels import reference
    from dsxfer.kernels.alignment_loss import alignment_loss as triton_alignment

    N, T, H = (41, 9, 96) if b.smoke else (4096, 128, 1024)
    dev = b.device
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(N, T, H, generator=g).to(dev, torch.bfloat16).requires_grad_()
    lengths = torch.randint(T // 2, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long().to(dev)
    teacher = torch.randn(N, H, generator=g).to(dev)
    args = (mask, teacher, "infonce", 0.05)

    impls = [("eager reference", lambda: reference.alignment_loss(hidden, *args))]
    if compile_backend:
        compiled = torch.compile(reference.alignment_loss, backend=compile_backend)
        impls.append(("torch.compile(reference)", lambda: compiled(hidden, *args)))
    impls.append(("dsxfer Triton", lambda: triton_alignment(hidden, *args)))

    flops = 3 * 2 * N * N * H
    bytes_min = 2 * N * T * H * hidden.element_size()
    rows, eager_out = [], None
    for name, fn in impls:
        step = fwd_bwd(fn, [hidden])
        out = step().detach().float()
        eager_out = out if eager_out is None else eager_out
        ms = b.time_ms(step)
        rows.append(dict(kernel=f"InfoNCE loss N={N} T={T} H={H} bf16", impl=name, ms=ms,
                         gbs=bytes_min / ms / 1e6, tflops=flops / ms / 1e9, mib=b.peak_mib(step),
                         err=(out - eager_out).abs().max().item()))
    return rows, "torch.compile(reference)" if compile_backend else "eager reference"


def attention_rows(b: Bench, compile_backend):
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from dsxfer.kernels import reference
    from dsxfer.kernels.prefix_attention import prefix_attention as triton_attention

    B, T, P, Hh, D = (1, 40, 7, 2, 32) if b.smoke else (8, 2048, 64, 32, 128)
    dev, dt = b.device, torch.bfloat16 if not b.smoke else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, Hh, T, D, generator=g).to(dev, dt).requires_grad_() for _ in range(3))
    pk, pv = (torch.randn(Hh, P, D, generator=g).to(dev, dt).requires_grad_() for _ in range(2))
    grad_out = torch.randn(B, Hh, T, D, generator=g).to(dev, dt)
    leaves = [q, k, v, pk, pv]

    def concat():
        return (torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2),
                torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2))

    causal_bias = causal_lower_right(T, P + T)  # query i sees key j <= i + P: prefix + causal sequence

    def sdpa():
        kk, vv = concat()
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=causal_bias)

    impls = [("eager reference", lambda: reference.prefix_attention(q, k, v, pk, pv, causal=True))]
    baseline = "concat + SDPA"
    if compile_backend:
        compiled = torch.compile(reference.prefix_attention, backend=compile_backend)
        impls.append(("torch.compile(reference)", lambda: compiled(q, k, v, pk, pv, causal=True)))
    sdpa_name = f"concat + SDPA [{sdpa_backend_used(lambda: sdpa().sum().backward())}]"
    impls.append((sdpa_name, sdpa))
    if compile_backend:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def prefix_causal(b_, h_, q_idx, kv_idx):
            return (kv_idx < P) | (kv_idx - P <= q_idx)

        block_mask = create_block_mask(prefix_causal, None, None, T, P + T, device=dev)
        flex = torch.compile(flex_attention, backend=compile_backend) if not b.smoke else flex_attention

        def flex_step():
            kk, vv = concat()
            if b.smoke:
                return flex(q.detach(), kk.detach(), vv.detach(), block_mask=block_mask)
            return flex(q, kk, vv, block_mask=block_mask)

        # FlexAttention has no CPU backward: the smoke run checks its forward only.
        impls.append(("concat + FlexAttention" + (" (forward only)" if b.smoke else ""), flex_step))
    impls.append(("dsxfer Triton", lambda: triton_attention(q, k, v, pk, pv, causal=True)))
    impls.append(("dsxfer Triton, fast backward", lambda: triton_attention(q, k, v, pk, pv, causal=True)))

    fwd_flops = 4 * B * Hh * D * (T * P + T * (T + 1) / 2)
    flops = 3.5 * fwd_flops
    rows, eager_out = [], None
    for name, fn in impls:
        env = {"DSXFER_ATTENTION_BACKWARD": "fast"} if name.endswith("fast backward") else None
        step = fwd_bwd(fn, leaves, grad_out, forward_only=name.endswith("(forward only)"), env=env)
        out = step().detach().float()
        eager_out = out if eager_out is None else eager_out
        ms = b.time_ms(step)
        rows.append(dict(kernel=f"prefix attention B={B} T={T} P={P} {Hh}x{D} causal {str(dt)[6:]}", impl=name,
                         ms=ms, tflops=flops / ms / 1e9, gbs=None, mib=b.peak_mib(step),
                         err=(out - eager_out).abs().max().item()))
        if name.startswith("concat + SDPA"):
            baseline = name
    return rows, baseline


def table(rows, baseline_name: str, roof) -> str:
    eager = rows[0]["ms"]
    base = next((r["ms"] for r in rows if r["impl"] == baseline_name), eager)
    lines = [f"| kernel | implementation | median ms | x eager | x {baseline_name} | achieved | % roofline | "
             f"peak MiB | max abs diff vs eager |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["gbs"] is not None:
            achieved = f"{r['gbs']:.0f} GB/s, {r['tflops']:.1f} TFLOP/s"
            pct = f"{100 * r['gbs'] / (roof[2] * 1e3):.0f}% HBM" if roof else "n/a"
        else:
            achieved = f"{r['tflops']:.1f} TFLOP/s"
            pct = f"{100 * r['tflops'] / roof[0]:.0f}% bf16" if roof else "n/a"
        mib = f"{r['mib']:.0f}" if r["mib"] is not None else "n/a"
        lines.append(f"| {r['kernel']} | {r['impl']} | {r['ms']:.3f} | {eager / r['ms']:.2f} | {base / r['ms']:.2f} | "
                     f"{achieved} | {pct} | {mib} | {r['err']:.2e} |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        compile_backend = None if args.skip_compile else "aot_eager"  # no C++ toolchain needed on CPU
        card = "CPU (smoke run: Triton interpreter, tiny shapes; timings mean nothing)"
    else:
        if not torch.cuda.is_available():
            print("bench/gpu_kernels.py needs a CUDA GPU (none visible to torch). Run with --smoke to check the "
                  "script on CPU with tiny shapes.", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        compile_backend = None if args.skip_compile else "inductor"
        card = torch.cuda.get_device_name()
    roof = None if args.smoke else roofline(card)
    bench = Bench(device, args.smoke)

    started = time.time()
    sections = []
    for rows_fn, goal in ((alignment_rows, "goal: >= 2x eager and >= 1.2x torch.compile"),
                          (attention_rows, "goal: >= 0.9x concat + SDPA (FlashAttention), lower peak memory")):
        rows, baseline = rows_fn(bench, compile_backend)
        sections.append(f"{goal}\n\n{table(rows, baseline, roof)}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = f"torch {torch.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    header = f"### {card} -- {stamp} ({versions}; `python bench/gpu_kernels.py{' --smoke' if args.smoke else ''}`)"
    if roof:
        header += f"\n\nRoofline used: {roof[0]:.0f} TFLOP/s bf16 dense, {roof[2]} TB/s HBM."
    report = header + "\n\n" + "\n\n".join(sections) + f"\n\n(total wall time {time.time() - started:.0f} s)\n"
    print(report)
    if not (args.smoke or args.no_write):
        with PERF_MD.open("a") as f:
            f.write("\n" + report)
        print(f"appended to {PERF_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
