"""Training: one readable loop, top to bottom.

    data (task features + parallel pairs + source dev set)  ->  DeepSpeed engine  ->  for each micro-batch:
    task batch (+ an alignment batch every `alignment.every` micro-batches) -> forward -> NaN/Inf guard ->
    backward -> step at the accumulation boundary -> log / evaluate on the SOURCE dev set / checkpoint

`run_training` is the loop and takes ready-made data (`TrainData`); `train` builds that data from the
config (readers, featurization, k-shot sampling, overlap check) and then calls it. Early stopping only
ever looks at the source-language dev set (TyDi QA English dev for QA), never at target-language test data.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dsxfer.training import checkpoint as ckpt
from dsxfer.training import engine as eng
from dsxfer.training import runfolder
from dsxfer.training.memory import release_free_memory
from dsxfer.data.readers import format_skip_report
from dsxfer.errors import ConfigError, DsxferError

# Nominal peak FLOP/s for the MFU estimate. GPU: H100 SXM dense bf16 (989 TFLOP/s). CPU: 96 GFLOP/s per
# core (two 8-lane fp32 FMA units at 3 GHz). MFU is a rough yardstick, not a benchmark result.
GPU_PEAK_FLOPS = 989e12
CPU_PEAK_FLOPS_PER_CORE = 96e9


class TrainingDiverged(DsxferError):
    """Too many steps with a non-finite loss."""


@dataclass
class Batches:
    """`n` items, and `make(indices)` -> a dict of tensors holding those items."""

    n: int
    make: Callable[[list[int]], dict[str, torch.Tensor]]
    lengths: list[int] | None = None  # real tokens per item: lets train.batching=length_grouped group them


@dataclass
class TrainData:
    task: Batches | None                      # task features (source language + k target shots)
    align: Batches | None = None              # parallel pairs -> align_src_* / align_tgt_* / align_pair_ids
    align_probes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # lang -> fixed pair batch
    dev_eval: Callable[[torch.nn.Module], dict[str, float]] | None = None  # source dev set; "f1" or "accuracy"
    notes: list[str] = field(default_factory=list)         # what data assembly derived or dropped, for train.log
    skipped: list[dict[str, Any]] = field(default_factory=list)  # bad records left out: reason, count, example


class DataOrder:
    """An endless, seeded stream of item indices: epoch e is a permutation drawn from seed + e.

    The whole state is one position, so a resumed run continues exactly where the saved one was.
    Each rank takes its own slice of every global batch.
    """

    def __init__(self, n: int, seed: int, pos: int = 0):
        self.n, self.seed, self.pos = n, seed, pos
        self._epoch, self._perm = -1, None

    def _index(self, p: int) -> int:
        epoch = p // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[p % self.n]

    def next(self, per_rank: int, rank: int, world: int) -> list[int]:
        start = self.pos + rank * per_rank
        out = [self._index(p) for p in range(start, start + per_rank)]
        self.pos += per_rank * world
        return out


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def nominal_peak_flops() -> float:
    if torch.cuda.is_available():
        return GPU_PEAK_FLOPS
    return CPU_PEAK_FLOPS_PER_CORE * torch.get_num_threads()


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())


class Log:
    """Rank 0 writes: a text log (stdout + <output_dir>/train.log) and TensorBoard scalars."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, bar=None):
        self.enabled = enabled
        self.bar = bar
        self.file = None
        self.tb = None
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


def budget_warnings(cfg) -> list[str]:
    """Warm-ups that the step budget cuts short: what the LR and lambda reach, said before training starts."""
    t, a = cfg.train, cfg.alignment
    out = []
    if t.warmup_steps > 0 and t.warmup_steps >= t.max_steps:
        # optimizer step s (0-based) uses lr * (s + 1) / warmup_steps during warm-up (engine.lr_lambda)
        reached = t.max_steps / t.warmup_steps
        if t.warmup_steps > t.max_steps:
            out.append(f"warning: train.warmup_steps={t.warmup_steps} > train.max_steps={t.max_steps}: the learning rate never "
                       f"reaches its peak train.lr={t.lr:g}; it rises to {reached:.0%} of it ({t.lr * reached:.3g}) at the last step. "
                       "Lower train.warmup_steps or raise train.max_steps")
        else:
            out.append(f"warning: train.warmup_steps={t.warmup_steps} = train.max_steps: the learning rate reaches its peak "
                       f"train.lr={t.lr:g} only at the last step (warm-up takes the whole run). "
                       "Lower train.warmup_steps or raise train.max_steps")
    if a.enabled and a.warmup_steps > 0 and a.warmup_steps >= t.max_steps:
        # the micro-batches of optimizer step s use weight * s / warmup_steps (alignment.alignment_weight)
        reached = (t.max_steps - 1) / a.warmup_steps
        out.append(f"warning: alignment.warmup_steps={a.warmup_steps} >= train.max_steps={t.max_steps}: lambda never reaches "
                   f"alignment.weight={a.weight:g}; it rises to {reached:.0%} of it ({a.weight * reached:.3g}) at the last step. "
                   "Lower alignment.warmup_steps or raise train.max_steps")
    return out


def run_training(cfg, model: torch.nn.Module, data: TrainData, *, quiet: bool = False) -> dict[str, Any]:
    """Train `model` (a TransferModel) on `data` as `cfg` says; returns a summary of the run.

    Every rank calls this. Writes <output_dir>/config.yaml, trainable.safetensors (the best dev
    checkpoint when dev evaluation ran, else the last), train.log, tb/ and checkpoints/. The run folder
    is locked for the run (dsxfer.training.runfolder); an OSError on it becomes one line naming the path.
    """
    out_dir = Path(cfg.train.output_dir)
    eng.init_distributed()
    say = print if eng.rank() == 0 else (lambda *_: None)
    with runfolder.hold(out_dir, overwrite=cfg.train.overwrite, resume=cfg.train.resume, log=say):
        try:
            return _run(cfg, model, data, quiet=quiet)
        except OSError as e:
            raise runfolder.output_error(out_dir, e, "write") from None


def _run(cfg, model: torch.nn.Module, data: TrainData, *, quiet: bool) -> dict[str, Any]:
    t_cfg = cfg.train
    out_dir = Path(t_cfg.output_dir)
    info = eng.init_distributed()
    world, rank = eng.world_size(), eng.rank()
    ds = eng.build_ds_config(cfg, world)
    unfreezer = getattr(model, "unfreezer", None)
    if unfreezer is not None and eng.zero_stage(ds) != 0:
        raise ConfigError("freezing.strategy=gradual grows the trainable set during training, which ZeRO 1-3 cannot do; "
                          "use deepspeed.config=ds_configs/zero0.json (the frozen backbone is still not in the optimizer)")
    if data.task is None and data.align is None:
        raise ConfigError("nothing to train on: no task data and no parallel pairs")
    if (data.task is not None and data.task.n == 0) or (data.align is not None and data.align.n == 0):
        raise ConfigError("nothing to train on: the training data holds no features (check data.train_files / data.train_task)")
    # --- where we start: fresh, or from the latest complete checkpoint (before the engine: fail fast)
    resume_from = ckpt.resolve_resume(out_dir, t_cfg.resume, log=print if rank == 0 else (lambda *_: None))
    engine, _, _ = eng.initialize(model, cfg, ds)
    module = engine.module
    device = engine.device

    state: dict[str, Any] = {"task_pos": 0, "align_pos": 0, "micro": 0, "bad_steps": 0,
                             "best_score": None, "evals_without_improvement": 0, "best_step": None}
    if resume_from is not None:
        state.update({k: v for k, v in ckpt.load(engine, resume_from).items() if k in state})
    step = engine.global_steps
    module.set_step(step)
    if rank == 0:
        (out_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    task_order = DataOrder(data.task.n, t_cfg.seed, state["task_pos"]) if data.task else None
    if data.task is not None and data.task.lengths is not None and t_cfg.batching == "length_grouped":
        from dsxfer.data.length_order import LengthGroupedOrder

        task_order = LengthGroupedOrder(data.task.lengths, t_cfg.seed, state["task_pos"], global_batch=t_cfg.micro_batch_size * world)
    align_on = data.align is not None and cfg.alignment.enabled
    align_order = DataOrder(data.align.n, t_cfg.seed + 1, state["align_pos"]) if align_on else None
    teacher_cache = getattr(module, "teacher_cache", None)

    bar = None
    if rank == 0 and not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=t_cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    log = Log(out_dir, rank == 0, t_cfg.tensorboard, bar)
    try:
        from dsxfer.training.mfu import model_flops_per_token

        flops_per_token, flops_note = model_flops_per_token(module)  # what a step computes (cache, backward depth)
        peak = nominal_peak_flops()
        if resume_from is not None:
            log.line(f"resumed from {resume_from} at step {step}")
        for warning in budget_warnings(cfg):
            log.line(warning)
        log.config_text(cfg.to_yaml())
        for note in data.notes:
            log.line(note)
        if data.skipped:
            log.line(f"skipped {sum(g['count'] for g in data.skipped)} bad record(s) (data.on_error=skip): "
                     f"{format_skip_report(data.skipped)}")
        log.line(f"world size {world} (rank {info['rank']}), ZeRO-{eng.zero_stage(ds)}, precision {cfg.deepspeed.precision}, "
                 f"micro batch {t_cfg.micro_batch_size} x accumulation {t_cfg.grad_accum}; "
                 f"{flops_note}, against a nominal {peak / 1e12:.2f} TFLOP/s")
        log.line(getattr(module, "activation_cache_note", "activation cache: not used"))
        activation_cache = getattr(module, "activation_cache", None)

        def checkpoint(step: int) -> Path:
            state["task_pos"] = task_order.pos if task_order else 0
            state["align_pos"] = align_order.pos if align_order else 0
            path = ckpt.save(engine, out_dir, step, state, t_cfg.keep_last)
            if teacher_cache is not None:
                teacher_cache.flush()
            if activation_cache is not None:
                activation_cache.flush()
            return path

        def bad_step(at: int, what: str, many: str) -> None:
            """Count a skipped micro-batch or optimizer step; past train.max_bad_steps the run stops."""
            state["bad_steps"] += 1
            log.line(f"step {at}: {what} ({state['bad_steps']} of at most {t_cfg.max_bad_steps})")
            log.scalars(at, {"train/bad_steps": state["bad_steps"]})
            if state["bad_steps"] > t_cfg.max_bad_steps:
                raise TrainingDiverged(f"training stopped at step {at}: {state['bad_steps']} {many} "
                                       f"(train.max_bad_steps={t_cfg.max_bad_steps}); {_last_good(out_dir)}; "
                                       "lower train.lr or check the data")

        sums: dict[str, float] = {}
        final_losses: dict[str, float] = {}  # the last logged window's mean losses: the hparams metrics
        window = {"samples": 0, "tokens": 0, "micro": 0, "align_micro": 0, "t0": time.perf_counter()}
        grad_norm = None
        stopped = "max_steps"
        engine.train()
        while step < t_cfg.max_steps:
            # --- one micro-batch: task examples, plus parallel pairs every `alignment.every` micro-batches
            batch: dict[str, torch.Tensor] = {}
            if task_order is not None:
                batch.update(data.task.make(task_order.next(t_cfg.micro_batch_size, rank, world)))
            if align_order is not None and state["micro"] % cfg.alignment.every == 0:
                batch.update(data.align.make(align_order.next(cfg.alignment.batch_size, rank, world)))
            state["micro"] += 1
            if not batch:
                continue
            batch = _to(batch, device)
            out = engine(batch)
            loss = out["loss"]

            # --- NaN/Inf guard: every rank must agree, or one would step while another skips
            if eng.all_ranks_max(0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0) > 0:
                bad_step(step, f"non-finite loss ({float(loss.detach()):.4g}), micro-batch skipped",
                         "micro-batches with a non-finite loss")
                continue

            boundary = engine.is_gradient_accumulation_boundary()
            engine.backward(loss)
            before = eng.grad_norm_before_step(engine) if boundary else None
            lr_used = engine.get_lr()[0]  # the LR this optimizer step applies (the scheduler moves on in step())
            skipped_before = getattr(engine, "skipped_steps", 0)
            engine.step()
            if boundary:
                release_free_memory()  # glibc keeps freed activations of varying shapes; RSS stays flat (training.memory)
                grad_norm = eng.global_grad_norm(engine, before)
                if getattr(engine, "skipped_steps", 0) > skipped_before:  # ZeRO 1-3 refuse non-finite gradients themselves
                    bad_step(engine.global_steps, "non-finite gradients, DeepSpeed skipped the optimizer step, weights unchanged",
                             "steps with non-finite gradients")
                # a step that made a weight NaN/Inf stops the run before anything of it is saved
                if not eng.trainable_is_finite(engine.module):
                    raise TrainingDiverged(f"training stopped at step {engine.global_steps}: the optimizer step (lr {lr_used:.3g}) left "
                                           f"NaN/Inf values in the trainable parameters, nothing of it was saved; {_last_good(out_dir)}; "
                                           "lower train.lr or check the data")

            for key in ("loss", "task_loss", "align_loss", "preserve_loss"):
                sums[key] = sums.get(key, 0.0) + float(out[key].detach())
            window["micro"] += 1
            window["align_micro"] += "align_tgt_input_ids" in batch
            if "input_ids" in batch:
                window["samples"] += batch["input_ids"].shape[0] * world
                window["tokens"] += int(batch["attention_mask"].sum()) * world
            if "align_tgt_input_ids" in batch:
                window["tokens"] += int(batch["align_tgt_attention_mask"].sum() + batch["align_src_attention_mask"].sum()) * world
            if engine.global_steps == step:
                continue

            # --- an optimizer step happened
            step = engine.global_steps
            module.set_step(step)
            if bar is not None:
                bar.update(1)
            if unfreezer is not None:
                new = unfreezer.step(step)
                if new:
                    eng.add_trainable(engine, new)
                    log.line(f"step {step}: unfroze {len(new)} backbone tensors (gradual unfreezing)")
            last = step >= t_cfg.max_steps

            if step % t_cfg.log_every == 0 or last:
                elapsed = max(time.perf_counter() - window["t0"], 1e-9)
                n = max(window["micro"], 1)
                tokens_per_s = window["tokens"] / elapsed
                # the alignment loss is averaged over the micro-batches that had a pair batch (alignment.every)
                per = {k: max(window["align_micro"], 1) if k == "align_loss" else n for k in sums}
                scalars = {f"loss/{k.removesuffix('_loss') if k != 'loss' else 'total'}": v / per[k] for k, v in sums.items()}
                scalars.update({
                    "align/lambda": float(out["align_weight"]) if "align_weight" in out else 0.0,  # used by this step
                    "lr": lr_used,
                    "grad_norm": grad_norm,
                    "throughput/samples_per_s": window["samples"] / elapsed,
                    "throughput/tokens_per_s": tokens_per_s,
                    "throughput/mfu": flops_per_token * tokens_per_s / peak,
                    "memory/peak_mb": peak_memory_mb(),
                })
                for lang, probe in data.align_probes.items():
                    scalars[f"align/cosine/{lang}"] = module.alignment_cosine(_to(probe, device))
                log.scalars(step, scalars)
                final_losses = {f"final/{k.replace('/', '_')}": v for k, v in scalars.items() if k.startswith("loss/")}
                log.line(f"step {step} | loss {scalars['loss/total']:.4f} (task {scalars.get('loss/task', 0):.4f}, "
                         f"align {scalars.get('loss/align', 0):.4f}, lambda {scalars['align/lambda']:.3g}) | lr {scalars['lr']:.3g} | "
                         f"grad norm {grad_norm if grad_norm is not None else float('nan'):.3g} | "
                         f"{scalars['throughput/samples_per_s']:.2f} samples/s, {tokens_per_s:.0f} tokens/s, "
                         f"MFU {100 * scalars['throughput/mfu']:.2f}% | peak memory {scalars['memory/peak_mb']:.0f} MB"
                         + "".join(f" | cos {k} {scalars[f'align/cosine/{k}']:.3f}" for k in data.align_probes))
                sums.clear()
                window.update(samples=0, tokens=0, micro=0, align_micro=0, t0=time.perf_counter())

            # --- evaluation on the source-language dev set, early stopping on it
            stop_early = False
            if data.dev_eval is not None and ((t_cfg.eval_every and step % t_cfg.eval_every == 0) or last):
                module.eval()
                with torch.no_grad():
                    metrics = data.dev_eval(module)
                engine.train()
                score = metrics.get("f1", metrics.get("accuracy"))
                log.scalars(step, {f"dev/{k}": v for k, v in metrics.items()})
                improved = state["best_score"] is None or score > state["best_score"]
                if improved:
                    state.update(best_score=score, best_step=step, evals_without_improvement=0)
                    _save_trainable(module, out_dir, rank)
                else:
                    state["evals_without_improvement"] += 1
                log.line(f"step {step} | source dev {', '.join(f'{k} {v:.2f}' for k, v in metrics.items())}"
                         f" | best {state['best_score']:.2f} at step {state['best_step']}")
                patience = t_cfg.early_stopping_patience
                if patience and state["evals_without_improvement"] >= patience:
                    stop_early = True
                    stopped = "early_stopping"
                    log.line(f"early stopping at step {step}: no dev improvement in {patience} evaluations")

            # --- checkpoint (periodic and final)
            if (t_cfg.save_every and step % t_cfg.save_every == 0) or last or stop_early:
                log.line(f"step {step} | checkpoint {checkpoint(step)}")
            if stop_early:
                break

        if state["best_step"] is None:  # no dev evaluation: the last weights are the result
            _save_trainable(module, out_dir, rank)
        if teacher_cache is not None:
            teacher_cache.flush()
        if activation_cache is not None:
            activation_cache.flush()
            log.line(activation_cache.summary())
        log.hparams(step, cfg.to_dict(), {**final_losses, "final/best_source_dev": state["best_score"]})
        log.line(f"done: {stopped} at step {step}; trainable weights in {out_dir / 'trainable.safetensors'}, "
                 f"TensorBoard: tensorboard --logdir {out_dir / 'tb'}")
    except DsxferError as e:
        log.line(f"error: {e}")  # the log of a failed run says why it ended
        raise
    finally:
        if bar is not None:
            bar.close()
        log.close()
    summary = {"step": step, "stopped": stopped, "bad_steps": state["bad_steps"], "best_dev": state["best_score"],
               "best_step": state["best_step"], "output_dir": str(out_dir), "skipped_records": data.skipped}
    if rank == 0:
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    eng.barrier()
    return summary


def _last_good(out_dir: Path) -> str:
    good = ckpt.complete_checkpoints(out_dir)
    return f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written before"


def _save_trainable(module: torch.nn.Module, out_dir: Path, rank: int) -> None:
    """<out_dir>/trainable.safetensors (+ the soft prompt alone, for composition) with gathered values."""
    from safetensors.torch import save_file

    state = eng.gathered_trainable_state(module)  # every rank joins the gather
    ckpt.check_finite(state, str(out_dir / "trainable.safetensors"))
    if rank == 0:
        tmp = out_dir / ".trainable.safetensors.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, out_dir / "trainable.safetensors")
        key = "prompt.parts.trainable.embeddings"
        if key in state:
            from dsxfer.method.prompts import SoftPrompt

            SoftPrompt(state[key].shape[0], state[key].shape[1], state[key]).save(out_dir / "soft_prompt.safetensors", run=str(out_dir.name))


# ------------------------------------------------------------------------------ data from the config


def stable_pair_id(text_id: str) -> int:
    """A 63-bit integer for a pair id string: the teacher-cache key, the same in every run and process."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(text_id.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def _kept(records, skipped: list) -> list:
    """The good records of a reader's result; what it skipped goes to `skipped` (for train.log / the summary)."""
    skipped.extend(records.skipped)
    return list(records)


# pairs per language whose cosine the training log reports (align/cosine/<lang>); a fixed batch
PROBE_PAIRS = 16


def _parallel_pairs(cfg, skipped: list, notes: list) -> dict[str, list]:
    """Parallel pairs per target language: the user's src/tgt files, else Tatoeba (alignment.* fields).

    With the alignment loss on (or a lexicon to induce) up to alignment.max_pairs per language; with it
    off only the PROBE_PAIRS per language the log measures, and files that are missing then only cost the
    probes (a note says so), never the run.
    """
    from dsxfer.data.readers import read_parallel
    from dsxfer.data.tasks import tatoeba_files, tatoeba_pairs

    a, d = cfg.alignment, cfg.data
    full = a.enabled or d.induce_lexicon
    cap = a.max_pairs if full else PROBE_PAIRS
    why = (f"alignment.max_pairs={a.max_pairs} per language" if full else
           f"the alignment loss is off: only the first {PROBE_PAIRS} per language, read as probes for align/cosine/<lang>, never trained on")
    if a.src_file:
        files = {"custom": (Path(a.src_file), Path(a.tgt_file))}
    else:
        try:
            files = {lang: tatoeba_files(lang, d.data_dir) for lang in a.target_langs}
        except DsxferError as e:  # no data folder at all
            if full:
                raise
            notes.append(f"alignment probes: none logged (no align/cosine/*): {e}")
            return {}
    if not full:
        missing = {lang: next(str(f) for f in pair if not f.is_file()) for lang, pair in files.items() if not all(f.is_file() for f in pair)}
        if missing:
            source = "alignment.src_file/tgt_file" if a.src_file else "Tatoeba files for alignment.target_langs"
            notes.append(f"alignment probes: no align/cosine/ for {', '.join(missing)}: {source} not found "
                         f"({'; '.join(missing.values())}); the alignment loss is off, so the run goes on without them")
            files = {lang: pair for lang, pair in files.items() if lang not in missing}
    read = {}
    for lang, (src, tgt) in files.items():
        if a.src_file:
            read[lang] = _kept(read_parallel(src, tgt, "custom", on_error=d.on_error), skipped)
        else:
            read[lang] = _kept(tatoeba_pairs(lang, d.data_dir, on_error=d.on_error), skipped)
    if read:
        notes.append("parallel pairs: " + ", ".join(f"{lang} {min(cap, len(ps))}" + (f" of {len(ps)}" if len(ps) > cap else "")
                                                    for lang, ps in read.items()) + f" ({why})")
    return {lang: ps[:cap] for lang, ps in read.items()}


def _source_examples(cfg, skipped: list, notes: list) -> tuple[list, list]:
    """(training pool, held-out source dev set) of the source language.

    XTREME's TyDi QA GoldP dev ships without answers, so the source dev set for early stopping is a
    seeded hold-out of `data.dev_examples` questions from the source training file: never trained on,
    never target-language data.
    """
    from dsxfer.data.readers import read_jsonl, read_pawsx_tsv, read_squad_json
    from dsxfer.data.tasks import get_task, load_task

    d = cfg.data
    kind = cfg.model.task
    if d.train_files:
        items = []
        for f in d.train_files:
            if f.endswith(".jsonl"):
                items += _kept(read_jsonl(f, kind, d.source_lang, on_error=d.on_error), skipped)
            elif kind == "qa":
                items += _kept(read_squad_json(f, d.source_lang, on_error=d.on_error), skipped)
            else:
                items += _kept(read_pawsx_tsv(f, d.source_lang, on_error=d.on_error), skipped)
    else:
        spec = get_task(d.train_task)
        if spec.kind != kind:
            raise ConfigError(f"config value data.train_task={d.train_task} is a {spec.kind} task but model.task={kind}; make them agree")
        split = "train" if d.train_task == "tydiqa" else None
        items = _kept(load_task(d.train_task, d.source_lang, split, data_dir=d.data_dir, on_error=d.on_error), skipped)
    import random

    ids = sorted({ex.id for ex in items})
    n_dev = min(d.dev_examples, len(ids) // 5)  # never more than a fifth of the pool
    if n_dev < d.dev_examples:
        notes.append(f"source dev set: {n_dev} of the data.dev_examples={d.dev_examples} questions held out "
                     f"(at most a fifth of the {len(ids)} source questions)")
    else:
        notes.append(f"source dev set: {n_dev} of the {len(ids)} source questions held out (data.dev_examples), never trained on")
    dev_ids = set(random.Random(f"{cfg.train.seed}:dev").sample(ids, n_dev)) if n_dev else set()
    pool = [ex for ex in items if ex.id not in dev_ids]
    dev = [ex for ex in items if ex.id in dev_ids]
    if d.max_train_examples is not None and len(pool) > d.max_train_examples:
        notes.append(f"source training pool: {d.max_train_examples} of {len(pool)} questions (data.max_train_examples; "
                     f"{len(dev)} more are the source dev set)")
        keep = set(random.Random(f"{cfg.train.seed}:train").sample(sorted(ex.id for ex in pool), d.max_train_examples))
        pool = [ex for ex in pool if ex.id in keep]
    elif d.max_train_examples is not None:
        notes.append(f"source training pool: all {len(pool)} questions (data.max_train_examples={d.max_train_examples} "
                     f"is more than the {len(ids)} in the file minus the {len(dev)} of the source dev set)")
    else:
        notes.append(f"source training pool: all {len(pool)} questions (data.max_train_examples unset; "
                     f"{len(dev)} more are the source dev set)")
    return pool, dev


def _eval_examples(cfg) -> dict[str, list]:
    """The evaluation test sets the run will be scored on (for the overlap check only)."""
    from dsxfer.data.tasks import get_task, load_task, parse_langs

    out = {}
    for task in cfg.eval.tasks:
        spec = get_task(task)
        if spec.kind != cfg.model.task or task == "tydiqa":
            continue
        for lang in parse_langs(task, cfg.eval.langs if cfg.eval.langs == "all" else list(cfg.eval.langs)):
            out[f"{task}/{lang}"] = list(load_task(task, lang, data_dir=cfg.data.data_dir))
    return out


def build_train_data(cfg, model, tokenizer) -> tuple[TrainData, dict[str, Any]]:
    """Readers -> k-shot sampling -> overlap check -> featurization -> TrainData, and what was used.

    Every count it derives (source pool and dev set, row split, shots, pairs, pseudo data, features) is
    a line of `TrainData.notes` saying why; training writes them at the top of train.log.
    """
    from dsxfer.data.qa import collate_pairs, featurize_pairs, featurize_qa, pad_token_id
    from dsxfer.data.sampling import sample_k_shot
    from dsxfer.data.tasks import check_no_overlap, load_task

    from dsxfer.data.readers import skip_report

    d, a = cfg.data, cfg.alignment
    reserved = int(model.num_virtual_tokens)
    skipped: list = []
    notes: list[str] = []
    pool, dev = _source_examples(cfg, skipped, notes)

    # --- k target-language shots, never drawn from rows of an evaluation set
    evals = _eval_examples(cfg)
    # A task that is both trained on and evaluated (PAWS-X dev) is split by row id, the same rows held
    # out in every language: training keeps one half, the evaluation test rows are the other half.
    held_out: set[str] = set()
    split_tasks = sorted({key.split("/")[0] for key in evals} & {d.train_task, d.shot_task})
    if split_tasks:
        from dsxfer.data.tasks import split_rows

        shared = sorted({ex.id for key, exs in evals.items() if key.split("/")[0] in (d.train_task, d.shot_task) for ex in exs})
        _, test_ids = split_rows(shared, test_fraction=0.5, seed=cfg.train.seed)
        held_out = set(test_ids)
        evals = {key: [ex for ex in exs if ex.id in held_out] if key.split("/")[0] in (d.train_task, d.shot_task) else exs
                 for key, exs in evals.items()}
        n_pool, n_dev = len(pool), len(dev)
        pool = [ex for ex in pool if ex.id not in held_out]
        dev = [ex for ex in dev if ex.id not in held_out]
        notes.append(f"row split: {', '.join(split_tasks)} is both trained on and evaluated, so {len(held_out)} of its {len(shared)} "
                     f"row ids are held out as test rows in every language (test_rows.json); that leaves {len(pool)} of the "
                     f"{n_pool} source training questions and {len(dev)} of the {n_dev} source dev questions")
    shots: dict[str, list] = {}
    if d.k_shot > 0:
        drawn_from = []
        for lang in d.target_langs:
            shot_pool = _kept(load_task(d.shot_task, lang, data_dir=d.data_dir, on_error=d.on_error), skipped)
            banned = {ex.id for key, exs in evals.items() if key.startswith(f"{d.shot_task}/") for ex in exs}
            shots[lang] = sample_k_shot(shot_pool, d.k_shot, cfg.train.seed, lang=lang, exclude=sorted(banned),
                                        balanced=cfg.model.task == "classification")
            candidates = sum(ex.id not in banned for ex in shot_pool)
            drawn_from.append(f"{lang} from {candidates} rows" + (f" ({len(shot_pool) - candidates} of the {len(shot_pool)} are "
                                                                   "evaluation rows, never drawn)" if candidates < len(shot_pool) else ""))
        notes.append(f"k-shot: {d.k_shot} {d.shot_task} shots per target language (data.k_shot"
                     f"{', class-balanced' if cfg.model.task == 'classification' else ''}): {'; '.join(drawn_from)}")
    pairs_by_lang = _parallel_pairs(cfg, skipped, notes)
    # --- pseudo data: code-switched copies of source examples, translate-train files
    from dsxfer.data.augment import pseudo_training_data

    pseudo = pseudo_training_data(cfg, pool, backbone=model.backbone, tokenizer=tokenizer,
                                  pairs=[p for ps in pairs_by_lang.values() for p in ps])
    if pseudo:
        codeswitched = len(pool) * d.codeswitch_copies if d.codeswitch_prob > 0 else 0
        notes.append(f"pseudo data: {len(pseudo)} examples added: {codeswitched} code-switched copies "
                     f"(data.codeswitch_copies={d.codeswitch_copies} of each of the {len(pool)} source questions, "
                     f"data.codeswitch_prob={d.codeswitch_prob}) and {len(pseudo) - codeswitched} from data.translate_train")
    training = pool + [ex for exs in shots.values() for ex in exs] + pseudo
    for key, exs in evals.items():  # rows are translations of each other: compare ids across languages
        check_no_overlap(training, exs, f"training pool ({d.train_task} {d.source_lang} + {d.k_shot}-shot {d.shot_task}) vs {key}")

    pad = pad_token_id(tokenizer)
    if cfg.model.task == "qa":
        feats = featurize_qa(training, tokenizer, max_length=cfg.model.max_length, doc_stride=cfg.model.doc_stride,
                             reserved_tokens=reserved, with_labels=True)
        task = Batches(len(feats), lambda idx: feats.batch(idx, pad, with_labels=True), [len(r) for r in feats.input_ids])
        notes.append(f"task features: {task.n} windows from {len(training)} training examples (a context longer than "
                     f"model.max_length={cfg.model.max_length} minus {reserved} soft-prompt positions is split into "
                     f"overlapping windows, model.doc_stride={cfg.model.doc_stride})")
    else:
        pair_feats = featurize_pairs(training, tokenizer, max_length=cfg.model.max_length, reserved_tokens=reserved)
        task = Batches(len(training), lambda idx: collate_pairs(pair_feats, idx, pad, with_labels=True),
                       [len(r) for r in pair_feats["input_ids"]])
        notes.append(f"task features: {task.n}, one per training example (sentence pairs are truncated to "
                     f"model.max_length={cfg.model.max_length} minus {reserved} soft-prompt positions)")

    # --- parallel pairs: the alignment loss's batches, and the fixed probes the log measures either way
    align, probes, n_pairs = None, {}, 0
    if pairs_by_lang:
        pairs = [p for ps in pairs_by_lang.values() for p in ps]
        # the target side gets the soft prompt prepended: keep its real tokens within the budget
        enc = lambda texts, budget: tokenizer(texts, truncation=True, max_length=budget)["input_ids"]
        src_ids = enc([p.src for p in pairs], a.max_length)
        tgt_ids = enc([p.tgt for p in pairs], max(4, a.max_length - reserved))
        pair_ids = [stable_pair_id(f"{p.lang}:{p.id}") for p in pairs]

        def pad_rows(rows):
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            return ids, mask

        def make_align(idx):
            s, sm = pad_rows([src_ids[i] for i in idx])
            t, tm = pad_rows([tgt_ids[i] for i in idx])
            return {"align_src_input_ids": s, "align_src_attention_mask": sm, "align_tgt_input_ids": t,
                    "align_tgt_attention_mask": tm, "align_pair_ids": torch.tensor([pair_ids[i] for i in idx])}

        if a.enabled:  # with the alignment loss off the pairs are never a training batch
            n_pairs = len(pairs)
            align = Batches(n_pairs, make_align)
        start = 0
        for lang, ps in pairs_by_lang.items():  # a fixed probe of each language's first pairs
            if ps:
                probes[lang] = make_align(list(range(start, start + min(PROBE_PAIRS, len(ps)))))
            start += len(ps)

    # --- the source-language dev set for early stopping
    dev_eval = None
    if dev and cfg.model.task == "qa":
        from dsxfer.evaluation.evaluate import evaluate_qa

        def dev_eval(module):
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            predict = lambda b: (lambda o: (o["start_logits"], o["end_logits"]))(module(_to(b, device)))
            _, scores = evaluate_qa(predict, tokenizer, dev, lang=d.source_lang, max_length=cfg.model.max_length,
                                    doc_stride=cfg.model.doc_stride, reserved_tokens=reserved,
                                    batch_size=cfg.eval.batch_size, progress=False)
            return scores
    elif dev:
        from dsxfer.evaluation.evaluate import evaluate_classification

        def dev_eval(module):
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            _, scores = evaluate_classification(lambda b: module(_to(b, device))["logits"], tokenizer, dev, lang=d.source_lang,
                                                max_length=cfg.model.max_length, reserved_tokens=reserved,
                                                batch_size=cfg.eval.batch_size, progress=False)
            return scores

    used = {"source_examples": len(pool), "source_dev_examples": len(dev), "shots": shots, "test_rows": {"tasks": split_tasks, "ids": sorted(held_out)} if held_out else None,
            "task_features": task.n, "pseudo_examples": len(pseudo), "parallel_pairs": n_pairs, "source_dev_ids": [ex.id for ex in dev],
            "train_rows": {"task": None if d.train_files else d.train_task, "ids": sorted({ex.id for ex in pool})}}
    source_name = ", ".join(Path(f).name for f in d.train_files) if d.train_files else d.train_task
    notes.append(f"data: {len(pool)} {source_name} {d.source_lang} training examples + "
                 f"{sum(len(v) for v in shots.values())} target shots ({d.k_shot} per language from {d.shot_task}: "
                 f"{', '.join(shots) or 'none'}) -> {task.n} features; {len(dev)} held-out source dev examples; "
                 f"{n_pairs} parallel pairs for the alignment loss; no overlap with {', '.join(evals) or 'no evaluation set'}")
    report = skip_report(skipped)
    used["skipped_records"] = report
    return TrainData(task=task, align=align, align_probes=probes, dev_eval=dev_eval, notes=notes, skipped=report), used


def train(cfg, *, quiet: bool = False) -> dict[str, Any]:
    """Build model and data from the config and train: the body of `dsxfer train` and launchers/train.py."""
    from dsxfer.data.sampling import save_shots
    from dsxfer.method.model import build_transfer_model

    info = eng.init_distributed()
    ds = eng.build_ds_config(cfg, eng.world_size())
    rank0 = eng.rank() == 0
    say = print if rank0 else (lambda *_: None)
    out_dir = Path(cfg.train.output_dir)
    # the run folder is taken first: a second run on it, or someone else's files in it, stop us before any work
    with runfolder.hold(out_dir, overwrite=cfg.train.overwrite, resume=cfg.train.resume, log=say):
        with eng.zero3_construction(ds):  # under ZeRO-3 the backbone is partitioned while it loads
            model = build_transfer_model(cfg)
        if rank0:
            say(model.summary())
        data, used = build_train_data(cfg, model, model.tokenizer)
        if rank0:
            try:
                save_shots(out_dir / "shots.json", used["shots"], task=cfg.data.shot_task, k=cfg.data.k_shot, seed=cfg.train.seed)
                (out_dir / "source_dev_ids.json").write_text(json.dumps(used["source_dev_ids"]))
                if used["test_rows"]:  # rows the run never trained on: `dsxfer eval --run_dir` evaluates on these only
                    (out_dir / "test_rows.json").write_text(json.dumps(used["test_rows"]))
                # the source rows it trained on: `dsxfer eval --run_dir` leaves them out of the same task's evaluation
                (out_dir / "train_rows.json").write_text(json.dumps(used["train_rows"]))
            except OSError as e:
                raise runfolder.output_error(out_dir, e, "write") from None
        summary = run_training(cfg, model, data, quiet=quiet)
    summary.update({k: v for k, v in used.items() if k not in ("shots", "source_dev_ids", "test_rows", "train_rows", "skipped_records")},
                   rank=info["rank"])
    return summary
