"""The training loop on a tiny real TransferModel: interleaving, accumulation, NaN guard, exact resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from dsxfer import checkpoint as ckpt
from dsxfer.train import DataOrder, TrainData, TrainingDiverged, run_training
from test_engine import align_data, qa_data, tiny_cfg, tiny_model


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
        return {"f1": next(scores), "exact_match": 0.0}

    cfg = tiny_cfg(tmp_path, train={"max_steps": 10, "eval_every": 2, "early_stopping_patience": 2})
    summary = run_training(cfg, tiny_model(cfg), TrainData(task=qa_data(), dev_eval=dev_eval), quiet=True)
    assert summary["stopped"] == "early_stopping" and summary["step"] == 6
    assert summary["best_dev"] == 50.0 and summary["best_step"] == 2
    assert (tmp_path / "trainable.safetensors").is_file()
    assert calls == [False, False, False]  # evaluated in eval mode


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
