"""One GPU, end to end: training steps of the full method on a randomly initialised 1B decoder under ZeRO-3.

The run is started the way users start it, through the DeepSpeed launcher and the shipped GPU config
(soft prompt 16 + prefixes 16 in all layers + InfoNCE alignment, bf16):

    deepspeed --num_gpus 1 launchers/train.py --deepspeed ds_configs/zero3.json --config configs/xquad_fewshot.yaml ...

on a Llama built here with Llama-3.2-1B's layer shapes (16 layers, hidden 2048, 32 heads with 8 key/value
heads, FFN 8192) and the embedded model's tokenizer (250k entries), with random weights: speed does
not depend on what the weights are. The table gives what the training log measured over the timed
windows (every log window after the first, which holds start-up and autotuning): samples/s, real
tokens/s (task windows + alignment sentences), dsxfer's MFU estimate (the log's set-up line, quoted under
the table, says what it counts) and peak GPU memory (torch.cuda.max_memory_allocated).

    python bench/gpu_e2e.py               # CUDA; a few minutes on an H100/H200; appends its table to docs/PERF.md
    python bench/gpu_e2e.py --no-write    # print only
    python bench/gpu_e2e.py --smoke       # CPU: a tiny random decoder, fp32, 4 steps; checks the script

The data are the bundled benchmark files (DSXFER_DATA or ../shared/data), as for any run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "docs" / "PERF.md"
CONFIG = ROOT / "configs" / "xquad_fewshot.yaml"
DS_CONFIG = "ds_configs/zero3.json"

# Llama-3.2-1B's layer shapes; the vocabulary is the tokenizer's
GPU_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

STEP_LINE = re.compile(r"^step (\d+) \| loss .*? \| ([0-9.]+) samples/s, ([0-9.]+) tokens/s, MFU ([0-9.]+)% \| peak memory ([0-9.]+) MB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--smoke", action="store_true", help="CPU: a tiny random decoder, fp32, 4 steps, nothing written to docs/")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40; --smoke 4)")
    p.add_argument("--log_every", type=int, default=None, help="steps per timed window (default 5; --smoke 1)")
    p.add_argument("--batch", type=int, default=None, help="task windows per step (default: the config's train.micro_batch_size; --smoke 2)")
    p.add_argument("--max_length", type=int, default=None, help="window length (default: the config's model.max_length; --smoke 128)")
    p.add_argument("--tokenizer", default=None, help="folder holding tokenizer.json (default: the embedded model's folder)")
    p.add_argument("--work_dir", default=None, help="model folder and run folder (default: a fresh folder under runs/)")
    p.add_argument("--no-write", dest="write", action="store_false", help="print the table only; do not append it to docs/PERF.md")
    return p.parse_args(argv)


def build_model(folder: Path, tokenizer_dir: Path, shape: dict, device: str, dtype: str) -> int:
    """A Llama with random weights and the given tokenizer, saved as an HF folder; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, pad_token_id=pad,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(config)
    model = model.to(getattr(torch, dtype))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


def launch(model_dir: Path, out: Path, overrides: list[str]) -> tuple[list[str], float]:
    """The user's command line, run to its end; returns it and its wall time. A failed run exits with its log."""
    from dsxfer.training.engine import free_port, launch_env

    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--master_port", str(free_port()),
           "launchers/train.py", "--deepspeed", DS_CONFIG, "--config", str(CONFIG.relative_to(ROOT)),
           f"model.name_or_path={model_dir}", f"train.output_dir={out}", *overrides]
    print("$ " + " ".join(["deepspeed", *cmd[1:]]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"gpu_e2e: the training run failed (exit {proc.returncode}); its output ends:\n{proc.stdout[-4000:]}")
    return cmd, wall


def read_log(train_log: Path) -> dict:
    """The step lines of a training log (every window; the first, start-up, is not timed) and its set-up line."""
    text = train_log.read_text(encoding="utf-8")
    windows = [dict(step=int(m[1]), samples=float(m[2]), tokens=float(m[3]), mfu=float(m[4]), peak_mb=float(m[5]))
               for m in (STEP_LINE.match(line) for line in text.splitlines()) if m]
    if len(windows) < 2:
        sys.exit(f"gpu_e2e: {train_log} has {len(windows)} step line(s); the table needs the first (start-up) and at least one more")
    setup = next((line for line in text.splitlines() if line.startswith("world size")), "")
    return {"windows": windows, "setup": setup}


def table(log: dict, *, name: str, params: int, batch: int, length: int, precision: str, steps: int, wall_s: float) -> str:
    timed = log["windows"][1:]  # the first window holds start-up
    med = lambda k: statistics.median(w[k] for w in timed)
    rng = lambda k, f: f"{f(min(w[k] for w in timed))}-{f(max(w[k] for w in timed))}"
    rows = [
        "| model | parameters | ZeRO | precision | batch x length | steps timed (of all) | samples/s | real tokens/s | MFU (dsxfer estimate) | peak memory MB | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {name} | {params / 1e9:.2f}B | 3 (world size 1) | {precision} | {batch} x {length} | {timed[-1]['step'] - log['windows'][0]['step']} ({steps}) "
        f"| {med('samples'):.2f} ({rng('samples', lambda v: f'{v:.2f}')}) | {med('tokens'):.0f} ({rng('tokens', lambda v: f'{v:.0f}')}) "
        f"| {med('mfu'):.2f}% ({rng('mfu', lambda v: f'{v:.2f}')}) | {max(w['peak_mb'] for w in log['windows']):.0f} | {wall_s:.0f} |",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("gpu_e2e: no CUDA device here (torch.cuda.is_available() is False); on a CPU, --smoke checks the script")
    steps = args.steps or (4 if args.smoke else 40)
    log_every = args.log_every or (1 if args.smoke else 5)
    if steps < 2 * log_every:
        sys.exit(f"gpu_e2e: --steps {steps} gives fewer than two log windows of {log_every} steps; the first is not timed")
    if args.tokenizer:
        tokenizer_dir = Path(args.tokenizer)
    else:
        from dsxfer.method.embedded import embedded_model_path

        tokenizer_dir = Path(embedded_model_path())
    work = Path(args.work_dir) if args.work_dir else ROOT / "runs" / f"gpu_e2e-{time.strftime('%Y%m%d-%H%M%S')}"
    model_dir, out = work / "model", work / "run"
    if out.exists():
        shutil.rmtree(out)
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    precision, dtype = ("fp32", "float32") if args.smoke else ("bf16", "bfloat16")
    t = time.perf_counter()
    params = build_model(model_dir, tokenizer_dir, shape, "cpu" if args.smoke else "cuda", dtype)
    print(f"built a random Llama ({params:,} parameters, {shape}) in {model_dir} in {time.perf_counter() - t:.0f} s", flush=True)

    overrides = [f"train.max_steps={steps}", f"train.log_every={log_every}", "train.eval_every=0", "train.early_stopping_patience=0",
                 "data.dev_examples=0", f"model.dtype={dtype}", f"deepspeed.precision={precision}"]
    if args.smoke:
        overrides += ["model.doc_stride=32", "data.max_train_examples=12", "data.k_shot=2", "alignment.max_pairs=8",
                      "alignment.batch_size=4", "injection.reparam_hidden=16", "train.tensorboard=false"]
    else:
        overrides += ["data.max_train_examples=2000", "alignment.max_pairs=1000"]
    from dsxfer.config import load_config

    base = load_config(str(CONFIG))
    batch = args.batch or (2 if args.smoke else base.train.micro_batch_size)
    length = args.max_length or (128 if args.smoke else base.model.max_length)
    overrides += [f"train.micro_batch_size={batch}", f"model.max_length={length}"]
    cmd, wall = launch(model_dir, out, overrides)
    log = read_log(out / "train.log")
    name = "random Llama, " + ("tiny (smoke)" if args.smoke else "Llama-3.2-1B layer shapes, 250k vocabulary")
    text = table(log, name=name, params=params, batch=batch, length=length, precision=precision, steps=steps, wall_s=wall)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "CPU"
    command = " ".join(["deepspeed"] + cmd[1:])
    section = (f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {device}: the full method end to end (`python bench/gpu_e2e.py"
               f"{' --smoke' if args.smoke else ''}`)\n\n"
               f"torch {torch.__version__}. The run: `{command}`\n\n{text}\n\n"
               f"Medians over the timed log windows ({log_every} step(s) each), min-max in brackets; the first window (start-up) is not "
               f"timed. Peak memory: {'torch.cuda.max_memory_allocated' if device != 'CPU' else 'the process peak RSS'} over the run. "
               f"The training log's set-up line: `{log['setup']}`\n")
    print("\n" + section)
    (work / "gpu_e2e.json").write_text(json.dumps({"command": cmd, "wall_s": wall, "params": params, "shape": shape, **log}, indent=1))
    if args.write and not args.smoke:
        with PERF.open("a", encoding="utf-8") as f:
            f.write("\n" + section)
        print(f"appended to {PERF}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
