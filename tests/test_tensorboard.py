"""TensorBoard: the event files of a real run, read back with the tensorboard package, hold every scalar."""

from __future__ import annotations

import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsxfer.train import TrainData, run_training
from test_engine import align_data, qa_data, tiny_cfg, tiny_model

EXPECTED = {
    "loss/total", "loss/task", "loss/align", "loss/preserve", "align/lambda", "lr", "grad_norm",
    "align/cosine/deu", "align/cosine/fra", "throughput/samples_per_s", "throughput/tokens_per_s",
    "throughput/mfu", "memory/peak_mb", "dev/f1",
}


def test_event_files_hold_every_scalar(tmp_path):
    align, probes = align_data()
    cfg = tiny_cfg(tmp_path, alignment={"enabled": True, "warmup_steps": 4, "weight": 0.5},
                   train={"max_steps": 6, "log_every": 2, "eval_every": 3, "tensorboard": True,
                          "warmup_steps": 2, "scheduler": "linear"})
    run_training(cfg, tiny_model(cfg), TrainData(task=qa_data(), align=align, align_probes=probes,
                                                dev_eval=lambda m: {"f1": 10.0, "exact_match": 5.0}), quiet=True)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert EXPECTED <= tags, EXPECTED - tags
    series = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in EXPECTED}
    assert [s for s, _ in series["loss/total"]] == [2, 4, 6]
    assert all(math.isfinite(v) for t in EXPECTED for _, v in series[t])
    # values used by optimizer steps 2, 4, 6 (computed at steps 1, 3, 5): lambda warms up 0 -> 0.5 over
    # 4 steps; the LR warms up over 2 steps, then decays linearly to 0 at step 6
    assert [round(v, 6) for _, v in series["align/lambda"]] == [0.125, 0.375, 0.5]
    assert [round(v, 6) for _, v in series["lr"]] == [0.02, 0.015, 0.005]
    assert all(0 < v <= 1 for _, v in series["align/cosine/deu"])
    assert all(v > 0 for _, v in series["grad_norm"]) and all(v > 0 for _, v in series["memory/peak_mb"])
    assert [s for s, _ in series["dev/f1"]] == [3, 6]
