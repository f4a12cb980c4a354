"""TensorBoard: the event files of a real run, read back with the tensorboard package, hold every scalar."""

from __future__ import annotations

import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsxfer.data.build import TrainData
from dsxfer.training.train import run_training
from tiny import align_data, qa_data, tiny_cfg, tiny_model, tiny_train_run

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
                                                dev_eval=lambda m: ({}, {"f1": 10.0, "exact_match": 5.0})), quiet=True)
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


def test_run_without_alignment_logs_probe_cosines_config_and_hparams(tiny_model_dir, tmp_path):
    """Alignment off, Tatoeba pairs configured: probe cosines are logged, no pair is trained on, and the event
    files hold the resolved config (text) and the hparams with the final scores."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg, summary = tiny_train_run(tmp_path, tiny_model_dir, "alignment.enabled=false", "alignment.target_langs=deu,fra",
                                  "train.tensorboard=true")
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    for lang in ("deu", "fra"):
        assert [s for s, _ in scalars[f"align/cosine/{lang}"]] == [1, 2]
        assert all(-1 <= v <= 1 and v != 0 for _, v in scalars[f"align/cosine/{lang}"])
    # alignment off: nothing of the pairs reaches training
    assert summary["parallel_pairs"] == 0
    assert all(v == 0 for _, v in scalars["loss/align"]) and all(v == 0 for _, v in scalars["align/lambda"])
    log = (tmp_path / "run" / "train.log").read_text()
    steps = [line for line in log.splitlines() if line.startswith("step ") and "| loss " in line]
    assert len(steps) == 2 and all("align 0.0000, lambda 0)" in line and "| cos deu " in line for line in steps)
    assert "(the alignment loss is off: only the first 16 per language, read as probes for align/cosine/<lang>, never trained on)" in log

    # the resolved config as text
    (text,) = acc.Tensors("config/text_summary")
    assert "max_steps: 2" in text.tensor_proto.string_val[0].decode() and "enabled: false" in text.tensor_proto.string_val[0].decode()
    # hparams: the flattened config, and the final scores as metrics (also written as scalars, at the last step)
    start = plugin_data_pb2.HParamsPluginData.FromString(acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content)
    hparams = start.session_start_info.hparams
    assert hparams["train.max_steps"].number_value == 2 and hparams["alignment.enabled"].bool_value is False
    assert hparams["alignment.target_langs"].string_value == "deu,fra"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(acc.SummaryMetadata("_hparams_/experiment").plugin_data.content)
    metrics = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"final/loss_total", "final/loss_task", "final/loss_align", "final/best_source_dev"} <= metrics
    assert scalars["final/loss_total"] == [(2, scalars["loss/total"][-1][1])]
    assert scalars["final/best_source_dev"] == [(2, scalars["dev/f1"][-1][1])]
