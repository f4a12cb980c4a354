"""Checkpoints: ZeRO-3 files hold real trained values, corruption is refused with a fallback, keep-last-K."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dsxfer.training import checkpoint as ckpt
from dsxfer.training import engine as eng
from dsxfer.data.build import TrainData
from dsxfer.training.train import run_training
from tiny import ds_json, qa_data, tiny_cfg, tiny_model


def _zero3_json(tmp_path):
    raw = ds_json(3)
    raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # really partition the tiny tensors
    path = tmp_path / "zero3_tiny.json"
    path.write_text(json.dumps(raw))
    return str(path)


def test_zero3_checkpoint_holds_trained_values(tmp_path):
    cfg = tiny_cfg(tmp_path / "run", deepspeed={"config": _zero3_json(tmp_path)},
                   train={"max_steps": 6, "save_every": 3, "keep_last": 5})
    model = tiny_model(cfg, eng.build_ds_config(cfg, 1))
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run_training(cfg, model, TrainData(task=qa_data()), quiet=True)
    # the live parameters are partitioned: locally they hold nothing
    assert model.head.span.weight.numel() == 0
    from dsxfer.method import trainable

    live = trainable.gather(model)
    paths = ckpt.complete_checkpoints(tmp_path / "run")
    assert [p.name for p in paths] == ["step-00000003", "step-00000006"]
    for path in paths:
        ckpt.verify(path)
    saved = load_file(str(paths[-1] / "trainable.safetensors"))
    final = load_file(str(tmp_path / "run" / "trainable.safetensors"))
    assert set(saved) == set(initial) == set(final)
    for name, value in saved.items():
        assert value.shape == initial[name].shape and value.numel() > 0, name
        torch.testing.assert_close(value, live[name], rtol=0, atol=0)
        torch.testing.assert_close(final[name], live[name], rtol=0, atol=0)
    assert any(not torch.equal(saved[n], initial[n]) for n in saved)
    mid = load_file(str(paths[0] / "trainable.safetensors"))
    assert any(not torch.equal(mid[n], saved[n]) for n in saved)


def _two_checkpoints(tmp_path):
    cfg = tiny_cfg(tmp_path, train={"max_steps": 6, "save_every": 2, "keep_last": 2})
    run_training(cfg, tiny_model(cfg), TrainData(task=qa_data()), quiet=True)
    return ckpt.complete_checkpoints(tmp_path)


def test_keep_last_and_corruption_fallback(tmp_path):
    paths = _two_checkpoints(tmp_path)
    assert [p.name for p in paths] == ["step-00000004", "step-00000006"]  # step 2 pruned (keep_last=2)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))

    # flip one byte of the newest checkpoint's weights
    target = paths[-1] / "trainable.safetensors"
    blob = bytearray(target.read_bytes())
    blob[-1] ^= 0xFF
    target.write_bytes(bytes(blob))
    with pytest.raises(ckpt.CheckpointError, match="trainable.safetensors does not match its sha256"):
        ckpt.verify(paths[-1])
    warnings = []
    assert ckpt.resolve_resume(tmp_path, "auto", log=warnings.append) == paths[0]
    assert len(warnings) == 1 and "step-00000006" in warnings[0] and "falling back" in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.resolve_resume(tmp_path, str(paths[-1]))

    # a folder without a manifest (what a crash mid-write would look like if it had been renamed) is refused;
    # with no checkpoint left that verifies, auto-resume stops instead of starting over
    (paths[0] / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="none of the 2 checkpoint.*verifies.*train.resume=null"):
        ckpt.resolve_resume(tmp_path, "auto", log=warnings.append)
    assert "incomplete" in warnings[-1]


def test_resume_auto_continues_after_fallback(tmp_path):
    paths = _two_checkpoints(tmp_path)
    (paths[-1] / "state.json").write_text("{}")  # corrupt the newest
    cfg = tiny_cfg(tmp_path, train={"max_steps": 6, "save_every": 2, "keep_last": 2, "resume": "auto"})
    summary = run_training(cfg, tiny_model(cfg), TrainData(task=qa_data()), quiet=True)
    assert summary["step"] == 6
    log = (tmp_path / "train.log").read_text()
    assert f"resumed from {paths[0]} at step 4" in log
