"""The training log: rank 0 writes a text log (stdout or the progress bar, and <output_dir>/train.log) and
TensorBoard scalars under <output_dir>/tb.

The loop hands every micro-batch to `Log.count` and every optimizer step to `Log.step`; every
`train.log_every` steps (and at the last) `Log.step` turns the window since the previous log line into
scalars (mean losses, lambda, lr, gradient norm, throughput, MFU, peak memory, probe cosines) and one line.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

# Nominal peak FLOP/s for the MFU estimate. GPU: H100 SXM dense bf16 (989 TFLOP/s). CPU: 96 GFLOP/s per
# core (two 8-lane fp32 FMA units at 3 GHz). MFU is a rough yardstick, not a benchmark result.
GPU_PEAK_FLOPS = 989e12
CPU_PEAK_FLOPS_PER_CORE = 96e9
LOSSES = ("loss", "task_loss", "align_loss", "preserve_loss")


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def nominal_peak_flops() -> float:
    if torch.cuda.is_available():
        return GPU_PEAK_FLOPS
    return CPU_PEAK_FLOPS_PER_CORE * torch.get_num_threads()


@dataclass
class Window:
    """What the micro-batches since the last log line add up to."""

    sums: dict[str, float] = field(default_factory=dict)  # summed losses
    micro: int = 0
    align_micro: int = 0  # micro-batches that carried a pair batch: the alignment loss is averaged over these
    samples: int = 0
    tokens: int = 0
    t0: float = field(default_factory=time.perf_counter)


class Log:
    """Rank 0 writes: a text log (stdout + <output_dir>/train.log) and TensorBoard scalars."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, *, progress: tuple[int, int] | None = None,
                 log_every: int = 1, flops_per_token: int = 0, peak_flops: float = 1.0):
        """progress=(first step, max steps) shows a progress bar on rank 0; None shows none."""
        self.enabled, self.bar, self.log_every = enabled, None, log_every
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops  # dsxfer.training.mfu
        self.window = Window()
        self.final_losses: dict[str, float] = {}  # the last logged window's mean losses: the hparams metrics
        self.file = None
        self.tb = None
        if enabled and progress is not None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=progress[1], initial=progress[0], desc="train", unit="step", dynamic_ncols=True)
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(output_dir / "train.log", "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(output_dir / "tb"))

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def count(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor], world: int) -> None:
        """Add one micro-batch that trained (its losses, samples and real tokens, over all ranks) to the window."""
        w = self.window
        for key in LOSSES:
            w.sums[key] = w.sums.get(key, 0.0) + float(out[key].detach())
        w.micro += 1
        w.align_micro += "align_tgt_input_ids" in batch
        if "input_ids" in batch:
            w.samples += batch["input_ids"].shape[0] * world
            w.tokens += int(batch["attention_mask"].sum()) * world
        if "align_tgt_input_ids" in batch:
            w.tokens += int(batch["align_tgt_attention_mask"].sum() + batch["align_src_attention_mask"].sum()) * world

    def step(self, step: int, *, last: bool, out: dict[str, torch.Tensor], lr: float, grad_norm: float | None,
             probes: Callable[[], dict[str, float]]) -> None:
        """One optimizer step done: move the progress bar; every log_every steps (and at the last) write the
        window's scalars and the log line. Every rank calls it: `probes()` runs forwards (ZeRO-3: all ranks)."""
        if self.bar is not None:
            self.bar.update(1)
        if not (step % self.log_every == 0 or last):
            return
        w = self.window
        elapsed = max(time.perf_counter() - w.t0, 1e-9)
        tokens_per_s = w.tokens / elapsed
        per = {k: max(w.align_micro, 1) if k == "align_loss" else max(w.micro, 1) for k in w.sums}
        scalars = {f"loss/{k.removesuffix('_loss') if k != 'loss' else 'total'}": v / per[k] for k, v in w.sums.items()}
        scalars.update({
            "align/lambda": float(out["align_weight"]) if "align_weight" in out else 0.0,  # used by this step
            "lr": lr,
            "grad_norm": grad_norm,
            "throughput/samples_per_s": w.samples / elapsed,
            "throughput/tokens_per_s": tokens_per_s,
            "throughput/mfu": self.flops_per_token * tokens_per_s / self.peak_flops,
            "memory/peak_mb": peak_memory_mb(),
        })
        cosines = probes()
        scalars.update({f"align/cosine/{lang}": c for lang, c in cosines.items()})
        self.scalars(step, scalars)
        self.final_losses = {f"final/{k.replace('/', '_')}": v for k, v in scalars.items() if k.startswith("loss/")}
        self.line(f"step {step} | loss {scalars['loss/total']:.4f} (task {scalars.get('loss/task', 0):.4f}, "
                  f"align {scalars.get('loss/align', 0):.4f}, lambda {scalars['align/lambda']:.3g}) | lr {lr:.3g} | "
                  f"grad norm {grad_norm if grad_norm is not None else float('nan'):.3g} | "
                  f"{scalars['throughput/samples_per_s']:.2f} samples/s, {tokens_per_s:.0f} tokens/s, "
                  f"MFU {100 * scalars['throughput/mfu']:.2f}% | peak memory {scalars['memory/peak_mb']:.0f} MB"
                  + "".join(f" | cos {k} {c:.3f}" for k, c in cosines.items()))
        self.window = Window()

    def config_text(self, config_yaml: str) -> None:
        """The resolved config as TensorBoard text (tag `config`); indented, so Markdown shows it as code."""
        if self.tb is not None:
            self.tb.add_text("config", "\n".join("    " + line for line in config_yaml.splitlines()))

    def hparams(self, step: int, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """The flattened config as hparams with the run's final scores as metrics, so runs compare side by side
        in TensorBoard's HParams view; written into the run's own tb/ folder (not a sub-run)."""
        if self.tb is not None:
            finite = {k: v for k, v in metrics.items() if v is not None and math.isfinite(v)}
            self.tb.add_hparams(flat_hparams(config), finite, run_name=".", global_step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.file is not None:
            self.file.close()


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 0.02, 'alignment.target_langs': 'deu,fra', 'model.name_or_path': 'none', ...}: one
    scalar per config field; a list becomes comma-joined text and an unset value the text 'none'."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is None:
            flat[name] = "none"
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = str(value)
    return flat
