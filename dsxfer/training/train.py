"""Training: one readable loop, top to bottom.

    train(cfg): process group + ds-config -> run folder -> model (ZeRO-3: partitioned while it loads) -> data
    run_training(cfg, model, data): engine + resume -> for each micro-batch: task batch (+ an alignment batch
        every `alignment.every` micro-batches) -> forward -> NaN/Inf guard -> backward -> step at the
        accumulation boundary -> log / evaluate on the SOURCE dev set / checkpoint

`run_training` takes ready-made data (`TrainData`; tests pass their own). Early stopping only ever looks at
the source-language dev set, never at target-language test data. The run's position is a `TrainState`,
exactly what a checkpoint saves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsxfer.data.build import TrainData, build_train_data, write_data_record
from dsxfer.data.length_order import LengthGroupedOrder
from dsxfer.data.sampling import DataOrder
from dsxfer.errors import ConfigError, DsxferError
from dsxfer.method import trainable
from dsxfer.method.schedule import budget_warnings
from dsxfer.training import checkpoint as ckpt
from dsxfer.training import engine as eng
from dsxfer.training import runfolder
from dsxfer.training.checkpoint import TrainState
from dsxfer.training.log import Log, nominal_peak_flops
from dsxfer.training.memory import release_free_memory
from dsxfer.training.mfu import model_flops_per_token


class TrainingDiverged(DsxferError):
    """Too many steps with a non-finite loss."""


@dataclass
class Run:
    """What setup prepares once and the loop works with."""

    cfg: Any
    engine: Any                      # the DeepSpeed engine; engine.module is the TransferModel
    data: TrainData
    state: TrainState
    task_order: DataOrder | None     # a LengthGroupedOrder when train.batching=length_grouped
    align_order: DataOrder | None
    out_dir: Path
    rank: int
    world: int
    ds: dict[str, Any]               # the DeepSpeed config the engine runs
    resumed_from: Path | None        # the checkpoint the run continues, or None for a fresh run


def train(cfg, *, quiet: bool = False) -> dict[str, Any]:
    """Build model and data from the config and train: the body of `dsxfer train` and launchers/train.py."""
    from dsxfer.evaluation.evaluate import source_dev_evaluator
    from dsxfer.method.model import build_transfer_model

    eng.init_distributed()
    ds = eng.build_ds_config(cfg, eng.world_size())
    rank0 = eng.rank() == 0
    out_dir = Path(cfg.train.output_dir)
    # the run folder is taken first: a second run on it, or someone else's files in it, stop us before any work
    with runfolder.hold(out_dir, overwrite=cfg.train.overwrite, resume=cfg.train.resume, log=print if rank0 else _quiet):
        with eng.zero3_construction(ds):  # under ZeRO-3 the backbone is partitioned while it loads
            model = build_transfer_model(cfg)
        if rank0:
            print(model.summary())
        data, used = build_train_data(cfg, model, model.tokenizer)
        if data.dev_examples:
            data.dev_eval = source_dev_evaluator(cfg, model.tokenizer, data.dev_examples, reserved_tokens=model.num_virtual_tokens)
        if rank0:
            try:
                write_data_record(cfg, out_dir, used)
            except OSError as e:
                raise runfolder.output_error(out_dir, e, "write") from None
        summary = run_training(cfg, model, data, quiet=quiet, ds=ds)
    summary.update({k: v for k, v in used.items() if k not in ("shots", "source_dev_ids", "test_rows", "train_rows", "skipped_records")},
                   rank=eng.rank())
    return summary


def run_training(cfg, model: torch.nn.Module, data: TrainData, *, quiet: bool = False,
                 ds: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `model` (a TransferModel) on `data` as `cfg` says; returns a summary of the run.

    Every rank calls this. `ds` is the DeepSpeed config `train` made; without it (a caller with ready-made
    model and data) the process group and ds-config are made here. Writes <output_dir>/config.yaml,
    trainable.safetensors (the best dev checkpoint when dev evaluation ran, else the last), train.log, tb/
    and checkpoints/. The run folder is locked for the run (dsxfer.training.runfolder); an OSError on it
    becomes one line naming the path.
    """
    if ds is None:
        eng.init_distributed()
        ds = eng.build_ds_config(cfg, eng.world_size())
    out_dir = Path(cfg.train.output_dir)
    with runfolder.hold(out_dir, overwrite=cfg.train.overwrite, resume=cfg.train.resume, log=print if eng.rank() == 0 else _quiet):
        try:
            return _loop(_setup(cfg, model, data, ds), quiet=quiet)
        except OSError as e:
            raise runfolder.output_error(out_dir, e, "write") from None


def _setup(cfg, model, data: TrainData, ds: dict[str, Any]) -> Run:
    """Checks that need no engine, the resume point (before the engine: fail fast), the engine, the state."""
    if getattr(model, "unfreezer", None) is not None and eng.zero_stage(ds) != 0:
        raise ConfigError("freezing.strategy=gradual grows the trainable set during training, which ZeRO 1-3 cannot do; "
                          "use deepspeed.config=ds_configs/zero0.json (the frozen backbone is still not in the optimizer)")
    if data.task is None and data.align is None:
        raise ConfigError("nothing to train on: no task data and no parallel pairs")
    if (data.task is not None and data.task.n == 0) or (data.align is not None and data.align.n == 0):
        raise ConfigError("nothing to train on: the training data holds no features (check data.train_files / data.train_task)")
    out_dir, rank, t = Path(cfg.train.output_dir), eng.rank(), cfg.train
    resume_from = ckpt.resolve_resume(out_dir, t.resume, log=print if rank == 0 else _quiet)
    engine, _, _ = eng.initialize(model, cfg, ds)
    state = ckpt.load(engine, resume_from) if resume_from is not None else TrainState()
    state.step = engine.global_steps
    engine.module.set_step(state.step)
    if rank == 0:
        (out_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    task_order = DataOrder(data.task.n, t.seed, state.task_pos) if data.task else None
    if data.task is not None and data.task.lengths is not None and t.batching == "length_grouped":
        task_order = LengthGroupedOrder(data.task.lengths, t.seed, state.task_pos, global_batch=t.micro_batch_size * eng.world_size())
    align_on = data.align is not None and cfg.alignment.enabled
    align_order = DataOrder(data.align.n, t.seed + 1, state.align_pos) if align_on else None
    return Run(cfg, engine, data, state, task_order, align_order, out_dir, rank, eng.world_size(), ds, resume_from)


def _loop(run: Run, *, quiet: bool) -> dict[str, Any]:
    cfg, t, engine, data, state = run.cfg, run.cfg.train, run.engine, run.data, run.state
    module, device, unfreezer = engine.module, engine.device, getattr(engine.module, "unfreezer", None)
    flops, flops_note = model_flops_per_token(module)  # what one trained token costs (dsxfer.training.mfu)
    log = Log(run.out_dir, run.rank == 0, t.tensorboard, progress=None if quiet else (state.step, t.max_steps),
              log_every=t.log_every, flops_per_token=flops, peak_flops=nominal_peak_flops())
    probes = lambda: {lang: module.alignment_cosine(_to(probe, device)) for lang, probe in data.align_probes.items()}
    stopped, grad_norm = "max_steps", None
    try:
        _log_header(run, log, flops_note)
        engine.train()
        while state.step < t.max_steps:
            # --- one micro-batch: task examples, plus parallel pairs every `alignment.every` micro-batches
            batch: dict[str, torch.Tensor] = {}
            if run.task_order is not None:
                batch.update(data.task.make(run.task_order.next(t.micro_batch_size, run.rank, run.world)))
            if run.align_order is not None and state.micro % cfg.alignment.every == 0:
                batch.update(data.align.make(run.align_order.next(cfg.alignment.batch_size, run.rank, run.world)))
            state.micro += 1
            if not batch:
                continue
            batch = _to(batch, device)
            out = engine(batch)
            loss = out["loss"]
            # --- NaN/Inf guard: every rank must agree, or one would step while another skips
            if eng.all_ranks_max(0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0) > 0:
                _bad_step(run, log, state.step, f"non-finite loss ({float(loss.detach()):.4g}), micro-batch skipped",
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
                    _bad_step(run, log, engine.global_steps, "non-finite gradients, DeepSpeed skipped the optimizer step, "
                              "weights unchanged", "steps with non-finite gradients")
                # a step that made a weight NaN/Inf stops the run before anything of it is saved
                if not eng.trainable_is_finite(module):
                    raise TrainingDiverged(f"training stopped at step {engine.global_steps}: the optimizer step (lr {lr_used:.3g}) left "
                                           f"NaN/Inf values in the trainable parameters, nothing of it was saved; {_last_good(run.out_dir)}; "
                                           "lower train.lr or check the data")
            log.count(batch, out, run.world)
            if engine.global_steps == state.step:
                continue

            # --- an optimizer step happened
            state.step = engine.global_steps
            module.set_step(state.step)
            if unfreezer is not None and (new := unfreezer.step(state.step)):
                eng.add_trainable(engine, new)
                log.line(f"step {state.step}: unfroze {len(new)} backbone tensors (gradual unfreezing)")
            last = state.step >= t.max_steps
            log.step(state.step, last=last, out=out, lr=lr_used, grad_norm=grad_norm, probes=probes)
            stop_early = _evaluate(run, log, last)
            if stop_early:
                stopped = "early_stopping"
            if (t.save_every and state.step % t.save_every == 0) or last or stop_early:
                log.line(f"step {state.step} | checkpoint {_checkpoint(run)}")
            if stop_early:
                break

        _finish(run, log, stopped)
    except DsxferError as e:
        log.line(f"error: {e}")  # the log of a failed run says why it ended
        raise
    finally:
        log.close()
    summary = {"step": state.step, "stopped": stopped, "bad_steps": state.bad_steps, "best_dev": state.best_score,
               "best_step": state.best_step, "output_dir": str(run.out_dir), "skipped_records": data.skipped}
    if run.rank == 0:
        (run.out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    eng.barrier()
    return summary


def _finish(run: Run, log: Log, stopped: str) -> None:
    """The run's result (the last weights when no dev evaluation kept the best), the teacher cache, hparams."""
    state, module = run.state, run.engine.module
    if state.best_step is None:
        trainable.save(module, run.out_dir, run_name=run.out_dir.name)
    _flush_caches(module)
    if getattr(module, "activation_cache", None) is not None:
        log.line(module.activation_cache.summary())
    log.hparams(state.step, run.cfg.to_dict(), {**log.final_losses, "final/best_source_dev": state.best_score})
    log.line(f"done: {stopped} at step {state.step}; trainable weights in {run.out_dir / trainable.TRAINABLE_FILE}, "
             f"TensorBoard: tensorboard --logdir {run.out_dir / 'tb'}")


def _evaluate(run: Run, log: Log, last: bool) -> bool:
    """Every train.eval_every steps (and at the last): score the source-language dev set, keep the best
    weights as the run's result, and say whether early stopping ends the run now."""
    t, state, module = run.cfg.train, run.state, run.engine.module
    if run.data.dev_eval is None or not ((t.eval_every and state.step % t.eval_every == 0) or last):
        return False
    from dsxfer.evaluation.evaluate import SOURCE_DEV_DIR, write_source_dev

    module.eval()
    with torch.no_grad():
        predictions, metrics = run.data.dev_eval(module)
    run.engine.train()
    score = metrics.get("f1", metrics.get("accuracy"))
    log.scalars(state.step, {f"dev/{k}": v for k, v in metrics.items()})
    if state.best_score is None or score > state.best_score:
        state.best_score, state.best_step, state.evals_without_improvement = score, state.step, 0
        trainable.save(module, run.out_dir, run_name=run.out_dir.name)
        if run.rank == 0:  # the kept weights' dev predictions and scores, so nobody needs to score them again
            write_source_dev(run.out_dir / SOURCE_DEV_DIR, run.cfg, run.data.dev_examples, predictions, metrics,
                             method=run.cfg.name, run_dir=str(run.out_dir), step=state.step)
    else:
        state.evals_without_improvement += 1
    log.line(f"step {state.step} | source dev {', '.join(f'{k} {v:.2f}' for k, v in metrics.items())}"
             f" | best {state.best_score:.2f} at step {state.best_step}")
    patience = t.early_stopping_patience
    if patience and state.evals_without_improvement >= patience:
        log.line(f"early stopping at step {state.step}: no dev improvement in {patience} evaluations")
        return True
    return False


def _checkpoint(run: Run) -> Path:
    run.state.task_pos = run.task_order.pos if run.task_order else 0
    run.state.align_pos = run.align_order.pos if run.align_order else 0
    path = ckpt.save(run.engine, run.out_dir, run.state, run.cfg.train.keep_last)
    _flush_caches(run.engine.module)
    return path


def _flush_caches(module) -> None:
    """The teacher vectors and frozen activations computed so far, to their cache folders (if any)."""
    for cache in (getattr(module, "teacher_cache", None), getattr(module, "activation_cache", None)):
        if cache is not None:
            cache.flush()


def _bad_step(run: Run, log: Log, at: int, what: str, many: str) -> None:
    """Count a skipped micro-batch or optimizer step; past train.max_bad_steps the run stops."""
    state, limit = run.state, run.cfg.train.max_bad_steps
    state.bad_steps += 1
    log.line(f"step {at}: {what} ({state.bad_steps} of at most {limit})")
    log.scalars(at, {"train/bad_steps": state.bad_steps})
    if state.bad_steps > limit:
        raise TrainingDiverged(f"training stopped at step {at}: {state.bad_steps} {many} "
                               f"(train.max_bad_steps={limit}); {_last_good(run.out_dir)}; lower train.lr or check the data")


def _log_header(run: Run, log: Log, flops_note: str) -> None:
    """The top of train.log: where the run starts, warnings, the config, what data assembly derived, the setup."""
    cfg, t, data = run.cfg, run.cfg.train, run.data
    if run.resumed_from is not None:
        log.line(f"resumed from {run.resumed_from} at step {run.state.step}")
    for warning in budget_warnings(cfg):
        log.line(warning)
    log.config_text(cfg.to_yaml())
    for note in data.notes:
        log.line(note)
    if data.skipped:
        log.line(data.skipped_line())
    log.line(f"world size {run.world} (rank {run.rank}), ZeRO-{eng.zero_stage(run.ds)}, precision {cfg.deepspeed.precision}, "
             f"micro batch {t.micro_batch_size} x accumulation {t.grad_accum}; "
             f"{flops_note}, against a nominal {log.peak_flops / 1e12:.2f} TFLOP/s")
    log.line(getattr(run.engine.module, "activation_cache_note", "activation cache: not used"))


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _last_good(out_dir: Path) -> str:
    good = ckpt.complete_checkpoints(out_dir)
    return f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written before"


def _quiet(*_: Any) -> None:
    """The log function of ranks other than 0."""
