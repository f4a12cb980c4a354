"""The training loop on a tiny real TransferModel: interleaving, accumulation, NaN guard, exact resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dsxfer.training import checkpoint as ckpt
from dsxfer.data.sampling import DataOrder
from dsxfer.data.build import TrainData
from dsxfer.training.train import TrainingDiverged, run_training
from tiny import align_data, qa_data, tiny_cfg, tiny_model, tiny_train_run


def test_data_order_is_a_seeded_permutation_per_epoch_and_resumes():
    a = DataOrder(10, seed=5)
    first = a.next(10, 0, 1)
    assert sorted(first) == list(range(10))
    second = a.next(10, 0, 1)
    assert sorted(second) == list(range(10)) and second != first
    b = DataOrder(10, seed=5, pos=7)  # a resumed stream continues mid-epoch
    assert b.next(6, 0, 1) == (first + second)[7:13]
    # two ranks split one global batch without overlap
    r0, r1 = DataOrder(10, 5).next(3, 0, 2), DataOrder(10, 5).next(3, 1, 2)
    assert r0 + r1 == first[:6]


def _run(tmp_path, name, **train):
    align, probes = align_data()
    cfg = tiny_cfg(tmp_path / name, alignment={"enabled": True, "every": 2, "batch_size": 4},
                   train={"max_steps": 8, "grad_accum": 2, "save_every": 4, **train})
    model = tiny_model(cfg)
    summary = run_training(cfg, model, TrainData(task=qa_data(), align=align, align_probes=probes), quiet=True)
    return cfg, summary


def test_resumed_run_matches_uninterrupted_run(tmp_path):
    cfg, summary = _run(tmp_path, "full")
    assert summary["step"] == 8 and summary["bad_steps"] == 0
    full = load_file(str(tmp_path / "full" / "trainable.safetensors"))

    _run(tmp_path, "cut")
    # keep only the step-4 checkpoint: the run "stopped" there
    for path in ckpt.complete_checkpoints(tmp_path / "cut"):
        if path.name != "step-00000004":
            shutil.rmtree(path)
    (tmp_path / "cut" / "trainable.safetensors").unlink()
    summary = _run(tmp_path, "cut", resume="auto")[1]
    assert summary["step"] == 8
    resumed = load_file(str(tmp_path / "cut" / "trainable.safetensors"))
    assert set(resumed) == set(full)
    diff = max(float((resumed[k] - full[k]).abs().max()) for k in full)
    assert diff <= 1e-6, diff
    assert "resumed from" in (tmp_path / "cut" / "train.log").read_text()

    # and the resume is not trivially equal: a fresh 4-step run from scratch differs from the 8-step result
    half = load_file(str(ckpt.complete_checkpoints(tmp_path / "full")[0] / "trainable.safetensors"))
    assert max(float((half[k] - full[k]).abs().max()) for k in full) > 1e-4


def test_loss_falls_and_log_has_throughput(tmp_path):
    cfg = tiny_cfg(tmp_path, train={"max_steps": 12, "log_every": 4})
    run_training(cfg, tiny_model(cfg), TrainData(task=qa_data()), quiet=True)
    lines = [l for l in (tmp_path / "train.log").read_text().splitlines() if l.startswith("step ")]
    losses = [float(l.split("| loss ")[1].split()[0]) for l in lines if "| loss " in l]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert all("samples/s" in l and "tokens/s" in l and "MFU" in l and "peak memory" in l for l in lines if "| loss " in l)
    assert (tmp_path / "config.yaml").is_file()


def test_nan_guard_skips_and_stops(tmp_path):
    cfg = tiny_cfg(tmp_path, train={"max_bad_steps": 3})
    model = tiny_model(cfg)
    with torch.no_grad():
        model.head.span.bias.fill_(float("nan"))  # every loss is NaN from here on
    prompt_before = model.prompt.parts["trainable"].embeddings.detach().clone()
    with pytest.raises(TrainingDiverged, match="train.max_bad_steps=3"):
        run_training(cfg, model, TrainData(task=qa_data()), quiet=True)
    log = (tmp_path / "train.log").read_text()
    assert log.count("micro-batch skipped") == 4  # three tolerated, the fourth stops the run
    # skipped micro-batches never reach the optimizer
    assert torch.equal(model.prompt.parts["trainable"].embeddings.detach(), prompt_before)


def test_early_stopping_uses_the_dev_callable(tmp_path):
    scores = iter([50.0, 40.0, 45.0, 60.0])
    calls = []

    def dev_eval(module):
        calls.append(module.training)
        f1 = next(scores)
        return {"q1": f"answer at f1 {f1}"}, {"f1": f1, "exact_match": 0.0}

    cfg = tiny_cfg(tmp_path, train={"max_steps": 10, "eval_every": 2, "early_stopping_patience": 2})
    summary = run_training(cfg, tiny_model(cfg), TrainData(task=qa_data(), dev_eval=dev_eval), quiet=True)
    assert summary["stopped"] == "early_stopping" and summary["step"] == 6
    assert summary["best_dev"] == 50.0 and summary["best_step"] == 2
    assert (tmp_path / "trainable.safetensors").is_file()
    assert calls == [False, False, False]  # evaluated in eval mode
    # the kept weights' dev predictions and scores are the best evaluation's (step 2), not the last one's
    doc = json.loads((tmp_path / "source_dev" / "scores.json").read_text())
    assert doc["step"] == 2 and doc["task"] == "source_dev" and doc["results"][0]["f1"] == 50.0
    assert json.loads((tmp_path / "source_dev" / doc["results"][0]["predictions"]).read_text()) == {"q1": "answer at f1 50.0"}


def test_demo_yaml_is_the_demo_method_run(tmp_path):
    """configs/demo.yaml documents what `dsxfer demo` trains: the two must not drift apart."""
    from pathlib import Path

    from dsxfer.config import load_config
    from dsxfer.demo import _overrides

    root = Path(__file__).resolve().parents[1]
    from_yaml = load_config(root / "configs" / "demo.yaml").to_dict()
    from_demo = load_config(None, _overrides(tmp_path, "method", True, [])).to_dict()
    for key in ("output_dir", "overwrite"):  # where the run goes, and that the demo re-makes its own runs
        from_yaml["train"].pop(key)
        from_demo["train"].pop(key)
    assert from_yaml == from_demo


# ------------------------------------------------------------------ budgets and derived counts in train.log


def test_train_log_states_derived_counts_budget_warnings_and_missing_probes(tiny_model_dir, tmp_path):
    cfg, summary = tiny_train_run(tmp_path, tiny_model_dir, "train.warmup_steps=8", "alignment.enabled=false",
                                  f"alignment.src_file={tmp_path / 'absent.en'}", f"alignment.tgt_file={tmp_path / 'absent.de'}")
    log = (tmp_path / "run" / "train.log").read_text()
    # 20 source questions: the dev set is capped at a fifth (4 of 8), the pool is what is left (16, under the cap of 32)
    assert summary["source_dev_examples"] == 4 and summary["source_examples"] == 16
    assert "source dev set: 4 of the data.dev_examples=8 questions held out (at most a fifth of the 20 source questions)" in log
    assert ("source training pool: all 16 questions (data.max_train_examples=32 is more than the 20 in the file "
            "minus the 4 of the source dev set)") in log
    assert f"task features: {summary['task_features']} windows from 16 training examples" in log
    # warm-up over 8 of 2 steps: the warning says what the LR reaches, and the loop's last step used exactly that
    assert ("warning: train.warmup_steps=8 > train.max_steps=2: the learning rate never reaches its peak train.lr=0.02; "
            "it rises to 25% of it (0.005) at the last step") in log
    last_step = next(line for line in log.splitlines() if line.startswith("step 2 | loss"))
    assert "| lr 0.005 |" in last_step
    # alignment off and no pair files: one line says why there are no probe cosines; the run still finished
    assert ("alignment probes: no align/cosine/ for custom: alignment.src_file/tgt_file not found "
            f"({tmp_path / 'absent.en'})") in log
    assert summary["stopped"] == "max_steps" and " cos " not in last_step


def test_budget_warnings_say_what_lr_and_lambda_reach(tmp_path):
    from dsxfer.training import engine as eng
    from dsxfer.method.schedule import budget_warnings

    cfg = tiny_cfg(tmp_path, alignment={"enabled": True, "warmup_steps": 10, "weight": 0.5},
                   train={"max_steps": 5, "warmup_steps": 5})
    lr_line, lambda_line = budget_warnings(cfg)
    assert "train.warmup_steps=5 = train.max_steps: the learning rate reaches its peak train.lr=0.02 only at the last step" in lr_line
    assert eng.lr_lambda("constant", 5, 5)(4) == 1.0  # the last optimizer step (index 4) is the first at the peak
    model = tiny_model(cfg)
    model.set_step(cfg.train.max_steps - 1)  # the weight the last step's micro-batches use
    assert ("alignment.warmup_steps=10 >= train.max_steps=5: lambda never reaches alignment.weight=0.5; "
            f"it rises to 40% of it ({model.alignment_weight():.3g}) at the last step") in lambda_line
    assert budget_warnings(tiny_cfg(tmp_path, train={"max_steps": 5, "warmup_steps": 4})) == []


def test_logged_alignment_loss_averages_only_the_micro_batches_with_pairs(tmp_path):
    """alignment.every=2: half the micro-batches carry pairs; the logged loss/align is their mean, not half of it."""
    align, _ = align_data()
    cfg = tiny_cfg(tmp_path, alignment={"enabled": True, "every": 2}, train={"max_steps": 4, "log_every": 2})
    model = tiny_model(cfg)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append((bool("align_tgt_input_ids" in args[0]), float(out["align_loss"]))))
    run_training(cfg, model, TrainData(task=qa_data(), align=align), quiet=True)
    logged = [float(l.split("align ")[1].split(",")[0]) for l in (tmp_path / "train.log").read_text().splitlines()
              if l.startswith("step ") and "| loss " in l]
    train_calls = seen[:4]  # the four training micro-batches of steps 1-4, in order
    window = [loss for has_pairs, loss in train_calls[:2] if has_pairs]
    assert [has for has, _ in train_calls] == [True, False, True, False]
    assert logged[0] == pytest.approx(sum(window) / len(window), abs=1e-4) and logged[0] > 0
