"""DeepSpeed engine: ds-config checks, and ZeRO 0/2/3 training a tiny real TransferModel in one process.

The model and the synthetic but learnable QA and alignment data come from tests/tiny.py. The backbone is
a real (tiny, randomly initialised) transformers XLM-R model wrapped in the real TransferModel; DeepSpeed
runs for real on its CPU accelerator over gloo.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from dsxfer.training import engine as eng
from dsxfer.errors import ConfigError
from tiny import ds_json, qa_data, tiny_cfg, tiny_model

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ config checks


def test_ds_config_filled_from_dsxfer_config():
    cfg = tiny_cfg(train={"micro_batch_size": 4, "grad_accum": 2, "grad_clip": 0.5})
    ds = eng.build_ds_config(cfg, 2, ds_json(3), "zero3.json")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert eng.zero_stage(ds) == 3 and "bf16" not in ds
    assert eng.build_ds_config(tiny_cfg(deepspeed={"precision": "bf16"}), 1, ds_json(0))["bf16"] == {"enabled": True}


@pytest.mark.parametrize("change, fragment", [
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu=8 disagrees with dsxfer's train.micro_batch_size = 4"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 disagrees"),
    ({"train_batch_size": 4}, "train_batch_size=4 disagrees with dsxfer's train.micro_batch_size x train.grad_accum x world size = 4 x 1 x 2"),
    ({"bf16": {"enabled": True}}, "trains in bf16 but deepspeed.precision=fp32"),
    ({"train_micro_batch_size_per_gpu": "auto"}, "train_micro_batch_size_per_gpu is \"auto\""),
    ({"optimizer": {"type": "Adam"}}, "has an \"optimizer\" section"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage=4 is invalid"),
])
def test_ds_config_disagreement_is_one_clear_line(change, fragment):
    ds = ds_json(2) | change
    with pytest.raises(ConfigError) as err:
        eng.build_ds_config(tiny_cfg(), 2, ds, "my.json")
    assert fragment in str(err.value) and "my.json" in str(err.value) and "\n" not in str(err.value)


def test_every_shipped_ds_config_is_valid_and_auto_free():
    names = sorted(p.name for p in (ROOT / "ds_configs").glob("*.json"))
    assert names == ["zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"]
    for name in names:
        cfg = tiny_cfg(deepspeed={"config": str(ROOT / "ds_configs" / name)})
        ds = eng.build_ds_config(cfg, 1)
        assert "auto" not in json.dumps(ds)


def test_lr_schedule_shapes():
    f = eng.lr_lambda("linear", 2, 10)
    assert [f(0), f(1), f(2), f(6), f(10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    g = eng.lr_lambda("cosine", 0, 4)
    assert g(0) == 1.0 and abs(g(2) - 0.5) < 1e-12 and abs(g(4)) < 1e-12
    assert eng.lr_lambda("constant", 3, 10)(9) == 1.0


# ------------------------------------------------------------------------------------ ZeRO 0/2/3


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_ten_steps_loss_falls(stage):
    eng.init_distributed()
    cfg = tiny_cfg()
    raw = ds_json(stage)
    if stage == 3:  # partition even tiny tensors, as the shipped threshold does for a real backbone's
        raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds = eng.build_ds_config(cfg, 1, raw, f"zero{stage}.json")
    model = tiny_model(cfg, ds)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine, _, _ = eng.initialize(model, cfg, ds)
    assert engine.zero_optimization_stage() == stage
    data = qa_data()
    losses = []
    for s in range(10):
        batch = data.make(list(range((4 * s) % 32, (4 * s) % 32 + 4)))
        out = engine(batch)
        engine.backward(out["loss"])
        engine.step()
        losses.append(float(out["loss"].detach()))
    assert engine.global_steps == 10
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    from dsxfer.method import trainable

    trained = trainable.gather(engine.module)
    assert set(trained) == set(initial)
    for name, value in trained.items():  # full shapes even when ZeRO-3 partitions the parameters
        assert value.shape == initial[name].shape and value.numel() > 0
    assert any(not torch.equal(trained[n], initial[n]) for n in trained)
    if stage == 3:
        # the frozen backbone is partitioned too: outside forward its embedding holds no local data
        assert engine.module.backbone.embeddings.word_embeddings.weight.numel() == 0
