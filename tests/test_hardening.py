"""Faults that must never lose work or run code, each through the path a user takes.

Non-finite values never reach a file; resume never unpickles foreign objects and never starts over
silently; a run folder is locked and never clobbers files dsxfer did not write; bad input and a full
disk are one line with exit code 2; a BOM is accepted by every reader; skipped records are grouped
and written to train.log and train_summary.json; the disk teacher cache is written by training.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsxfer.files import sha256_file
from dsxfer.training import checkpoint as ckpt
from dsxfer.data.readers import read_jsonl, read_parallel, read_pawsx_tsv, read_squad_json
from dsxfer.errors import DataError
from dsxfer.training.runfolder import RunFolderError
from dsxfer.data.build import TrainData
from dsxfer.training.train import TrainingDiverged, run_training
from launch import launch_env
from tiny import align_data, ds_json, qa_data, tiny_cfg, tiny_model

ROOT = Path(__file__).resolve().parents[1]
BOM = "\ufeff"


def _cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    # a fresh process, as a user starts it: not the rank variables earlier in-process runs set here
    return subprocess.run([sys.executable, "-m", "dsxfer.cli", *args], capture_output=True, text=True, cwd=cwd or ROOT,
                          env=launch_env(), timeout=timeout)


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    """The run failed the way the README promises: exit 2, one `dsxfer: error:` line, no traceback."""
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("dsxfer: error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------------------------ config values


@pytest.mark.parametrize("override, message", [
    ("train.lr=inf", "train.lr=inf is invalid: must be a finite number"),
    ("train.lr=nan", "train.lr=nan is invalid: must be a finite number"),
    ("train.lr=1e38", "train.lr=1e+38 is invalid: must be <= 1.0"),
    ("alignment.weight=-inf", "alignment.weight=-inf is invalid: must be a finite number"),
    ("train.log_every=0", "train.log_every=0 is invalid: must be > 0"),
    ("data.dev_examples=-3", "data.dev_examples=-3 is invalid: must be >= 0"),
    ("model.doc_stride=-1", "model.doc_stride=-1 is invalid: must be >= 0"),
    ("adapters.dropout=1.0", "adapters.dropout=1.0 is invalid: must be < 1.0"),
    ("eval.max_examples=0", "eval.max_examples=0 is invalid: must be > 0"),
    ("train.output_dir=", "train.output_dir='' is invalid: name a folder for this run"),
    ("train.output_dir=/", "train.output_dir='/' is invalid: name a folder for this run"),
])
def test_numbers_out_of_range_are_one_line(override, message):
    res = _cli("train", override)
    assert message in _one_error_line(res)


def test_every_numeric_field_states_a_range():
    """A new numeric field without bounds is a hole in validation: the dataclasses must say them."""
    import dataclasses
    import typing

    from dsxfer.config import ExperimentConfig

    unbounded = []
    for section in dataclasses.fields(ExperimentConfig):
        tp = typing.get_type_hints(ExperimentConfig)[section.name]
        if not dataclasses.is_dataclass(tp):
            continue
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            numeric = hints[f.name] in (int, float, int | None, float | None)
            if numeric and not {"gt", "ge", "lt", "le"} & set(f.metadata):
                unbounded.append(f"{section.name}.{f.name}")
    assert unbounded == []


# ------------------------------------------------------------------------------ non-finite weights


def _poison_gradients(model) -> None:
    """A fault the loss guard cannot see: the loss stays finite, one gradient becomes infinite."""
    model.head.span.weight.register_hook(lambda g: g * float("inf"))


@pytest.mark.parametrize("stage, message", [
    # ZeRO-0: the client AdamW applies the infinite gradient, the weight check after the step stops the run
    (0, r"step 3: the optimizer step .* left NaN/Inf values in the trainable parameters, nothing of it was saved"),
    # ZeRO 1-3: DeepSpeed skips a step with non-finite gradients; dsxfer counts it as a bad step
    (2, r"step 4: 2 steps with non-finite gradients \(train.max_bad_steps=1\)"),
])
def test_a_step_that_makes_weights_non_finite_stops_and_saves_nothing_of_it(tmp_path, stage, message):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds_json(stage)))
    out = tmp_path / "run"
    cfg = tiny_cfg(out, deepspeed={"config": str(ds_path)}, train={"max_steps": 6, "save_every": 2, "max_bad_steps": 1})
    from dsxfer.training import engine as eng

    model = tiny_model(cfg, eng.build_ds_config(cfg, 1))
    healthy = {"steps": 0}

    def poison_at_step_3(module, args):  # two good steps (a checkpoint at 2), then the fault
        healthy["steps"] += 1
        if healthy["steps"] == 3:
            _poison_gradients(module)

    model.register_forward_pre_hook(poison_at_step_3)
    with pytest.raises(TrainingDiverged, match=message + r".*the last good checkpoint is .*step-00000002"):
        run_training(cfg, model, TrainData(task=qa_data()), quiet=True)
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-00000002"]
    for path in [out / "checkpoints" / "step-00000002" / "trainable.safetensors", *out.glob("trainable.safetensors")]:
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values()), path
    assert "error: training stopped at step" in (out / "train.log").read_text()


def test_non_finite_values_are_never_written():
    with pytest.raises(ckpt.NonFiniteError, match="1 trainable tensor.*first: b.*refusing to write"):
        ckpt.check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, "trainable.safetensors")


# ------------------------------------------------------------------------------ resume: no pickles, no silent restart


class _Planted:
    """What a tampered checkpoint file would hold: unpickling it runs os.makedirs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _rehash(checkpoint: Path) -> None:
    """Write a manifest that matches the files: what anyone who can write the run folder can do."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in manifest["files"]:
        f = checkpoint / name
        manifest["files"][name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_resume_never_unpickles_a_planted_object(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, train={"max_steps": 2, "save_every": 2})
    run_training(cfg, tiny_model(cfg), TrainData(task=qa_data()), quiet=True)
    (checkpoint,) = ckpt.complete_checkpoints(out)
    (target,) = (checkpoint / "ds").rglob("mp_rank_00_model_states.pt")
    marker = tmp_path / "code-ran"
    with open(target, "wb") as f:
        pickle.dump({"module": _Planted(str(marker))}, f, protocol=2)  # the protocol torch.save writes
    _rehash(checkpoint)
    ckpt.verify(checkpoint)  # the manifest cannot tell: the allow-list must

    resumed = tiny_cfg(out, train={"max_steps": 4, "save_every": 2, "resume": "auto"})
    with pytest.raises(ckpt.CheckpointError, match=r"mp_rank_00_model_states.pt holds the Python object os.makedirs, "
                                                     r"which no checkpoint written by dsxfer contains; it was not loaded"):
        run_training(resumed, tiny_model(resumed), TrainData(task=qa_data()), quiet=True)
    assert not marker.exists()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_checkpoints_load_with_weights_only(tmp_path, stage):
    """What DeepSpeed writes at every stage loads through the allow-list (and resumes)."""
    from dsxfer.training import engine as eng

    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds_json(stage)))
    out = tmp_path / "run"
    cfg = tiny_cfg(out, deepspeed={"config": str(ds_path)}, train={"max_steps": 2, "save_every": 2})
    run_training(cfg, tiny_model(cfg, eng.build_ds_config(cfg, 1)), TrainData(task=qa_data()), quiet=True)
    with torch.serialization.safe_globals(ckpt.ds_safe_globals()):
        for f in (out / "checkpoints").rglob("*.pt"):
            torch.load(f, weights_only=True)
    resumed = tiny_cfg(out, deepspeed={"config": str(ds_path)}, train={"max_steps": 3, "save_every": 2, "resume": "auto"})
    summary = run_training(resumed, tiny_model(resumed, eng.build_ds_config(resumed, 1)), TrainData(task=qa_data()), quiet=True)
    assert summary["step"] == 3 and "resumed from" in (out / "train.log").read_text()


def test_resume_with_every_checkpoint_corrupt_stops_and_keeps_them(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, train={"max_steps": 4, "save_every": 2})
    run_training(cfg, tiny_model(cfg), TrainData(task=qa_data()), quiet=True)
    paths = ckpt.complete_checkpoints(out)
    assert len(paths) == 2
    blobs = {}
    for p in paths:
        (p / "state.json").write_text("{}")
        blobs[p] = (p / "state.json").read_bytes()
    resumed = tiny_cfg(out, train={"max_steps": 6, "save_every": 2, "resume": "auto"})
    with pytest.raises(ckpt.CheckpointError, match=r"none of the 2 checkpoint\(s\) .* verifies.*nothing was loaded or changed.*"
                                                     r"train.resume=null and train.overwrite=true"):
        run_training(resumed, tiny_model(resumed), TrainData(task=qa_data()), quiet=True)
    assert ckpt.complete_checkpoints(out) == paths and all(p.joinpath("state.json").read_bytes() == b for p, b in blobs.items())


def test_a_newer_unverified_checkpoint_is_moved_aside_not_overwritten(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, train={"max_steps": 4, "save_every": 2})
    run_training(cfg, tiny_model(cfg), TrainData(task=qa_data()), quiet=True)
    newest = ckpt.complete_checkpoints(out)[-1]
    (newest / "state.json").write_text('{"tampered": true}')
    resumed = tiny_cfg(out, train={"max_steps": 4, "save_every": 2, "resume": "auto"})
    run_training(resumed, tiny_model(resumed), TrainData(task=qa_data()), quiet=True)  # from step 2 to 4 again
    kept = newest.with_name(newest.name + ".corrupt")
    assert json.loads((kept / "state.json").read_text()) == {"tampered": True}
    ckpt.verify(newest)  # the new step-4 checkpoint


# ------------------------------------------------------------------------------ full disk


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_last_good_one(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test needs a tmpfs mount (root): {mounted.stderr}"
    try:
        out = disk / "run"
        cfg = tiny_cfg(out, train={"max_steps": 2, "save_every": 2})
        run_training(cfg, tiny_model(cfg), TrainData(task=qa_data()), quiet=True)
        (good,) = ckpt.complete_checkpoints(out)
        size = sum(f.stat().st_size for f in good.rglob("*") if f.is_file())
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        # leave room for the log lines, not for another checkpoint
        (disk / "filler").write_bytes(b"\0" * max(0, free - size // 2))
        resumed = tiny_cfg(out, train={"max_steps": 4, "save_every": 2, "resume": "auto"})
        with pytest.raises(ckpt.CheckpointError, match=rf"could not write checkpoint .*step-00000004: No space left on device .*; "
                                                         rf"the last good checkpoint is {good}; free disk space"):
            run_training(resumed, tiny_model(resumed), TrainData(task=qa_data()), quiet=True)
        assert ckpt.complete_checkpoints(out) == [good]
        ckpt.verify(good)
        assert not list((out / "checkpoints").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ------------------------------------------------------------------------------ run folder


HOLD = """
import sys, time
from dsxfer.training import runfolder
with runfolder.hold(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_second_run_on_a_locked_folder_stops_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path, tiny_model_dir):
    import socket

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=launch_env())
    try:
        assert holder.stdout.readline().strip() == "holding"
        args = ("train", f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}", "train.max_steps=1",
                "model.max_length=128", "model.doc_stride=32", "data.max_train_examples=8", "data.dev_examples=0",
                "alignment.enabled=false", "prompts.length=0", "injection.length=2", "train.tensorboard=false",
                "eval.langs=[en]")
        line = _one_error_line(_cli(*args))
        assert f"run folder {out} is in use by pid {holder.pid} on host {socket.gethostname()}" in line
        os.kill(holder.pid, signal.SIGKILL)  # the holder dies without cleaning up
        holder.wait()
        res = _cli(*args)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"taking over the lock of {out} left by pid {holder.pid}" in res.stdout
        assert (out / "trainable.safetensors").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_folder_with_foreign_files_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("my own notes\n")
    cfg = tiny_cfg(out, train={"max_steps": 2})
    with pytest.raises(RunFolderError, match=r"already holds files dsxfer did not write \(config.yaml\).*train.overwrite=true"):
        run_training(cfg, tiny_model(cfg), TrainData(task=qa_data()), quiet=True)
    assert (out / "config.yaml").read_text() == "my own notes\n"
    forced = tiny_cfg(out, train={"max_steps": 2, "overwrite": True})
    run_training(forced, tiny_model(forced), TrainData(task=qa_data()), quiet=True)
    assert (out / "trainable.safetensors").is_file()


def test_fresh_run_over_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(out, train={"max_steps": 2})
    run_training(cfg, tiny_model(cfg), TrainData(task=qa_data()), quiet=True)
    with pytest.raises(RunFolderError, match=r"holds the checkpoints of an earlier run \(1\): continue it with "
                                               r"train.resume=auto, start over with train.overwrite=true"):
        run_training(cfg, tiny_model(cfg), TrainData(task=qa_data()), quiet=True)
    forced = tiny_cfg(out, train={"max_steps": 2, "overwrite": True})
    run_training(forced, tiny_model(forced), TrainData(task=qa_data()), quiet=True)
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-00000002"]


def test_an_unwritable_output_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _cli("train", f"train.output_dir={blocker / 'run'}")
    assert f"cannot write the run folder {blocker / 'run'}" in _one_error_line(res)


# ------------------------------------------------------------------------------ readers: BOM, folders, empty, all skipped


def _squad(answer_start: int = 13) -> dict:
    return {"data": [{"title": "t", "paragraphs": [{"context": "Tom lives in Rome.", "qas": [
        {"id": "q1", "question": "Where?", "answers": [{"text": "Rome", "answer_start": answer_start}]}]}]}]}


def test_every_reader_accepts_a_bom(tmp_path):
    squad = tmp_path / "bom.json"
    squad.write_text(BOM + json.dumps(_squad()), encoding="utf-8")
    assert [r.id for r in read_squad_json(squad)] == ["q1"]

    jl = tmp_path / "bom.jsonl"
    jl.write_text(BOM + json.dumps({"id": "a", "sentence1": "x", "sentence2": "y", "label": 1}) + "\n", encoding="utf-8")
    assert [r.id for r in read_jsonl(jl, "classification", labels=(0, 1))] == ["a"]

    header = tmp_path / "header.tsv"
    header.write_text(BOM + "id\tsentence1\tsentence2\tlabel\n7\tone\ttwo\t1\n", encoding="utf-8")
    assert [(r.id, r.sentence1) for r in read_pawsx_tsv(header)] == [("7", "one")]

    plain = tmp_path / "plain.tsv"
    plain.write_text(BOM + "one\ttwo\t0\n", encoding="utf-8")
    assert [(r.id, r.sentence1) for r in read_pawsx_tsv(plain)] == [("0", "one")]

    src, tgt = tmp_path / "a.en", tmp_path / "a.de"
    src.write_text(BOM + "Hello\n", encoding="utf-8")
    tgt.write_text(BOM + "Hallo\n", encoding="utf-8")
    assert [(p.src, p.tgt) for p in read_parallel(src, tgt)] == [("Hello", "Hallo")]


def test_a_folder_given_as_a_data_file_says_so(tmp_path):
    with pytest.raises(DataError, match="is a folder, not a file"):
        read_squad_json(tmp_path)


def test_a_pawsx_file_with_only_its_header_is_one_line(tmp_path):
    only = tmp_path / "only.tsv"
    only.write_text("id\tsentence1\tsentence2\tlabel\n", encoding="utf-8")
    with pytest.raises(DataError, match="only.tsv: holds no records below its header"):
        read_pawsx_tsv(only)


def test_every_record_skipped_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_squad(answer_start=2)), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json: every record was skipped \(1 in all: field 'text' is not in the context"):
        read_squad_json(bad, on_error="skip")


def test_skipped_records_are_grouped_and_reach_train_log_and_summary(tmp_path, tiny_model_dir):
    doc = _squad()
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    for i in range(60):
        qas.append({"id": f"bad{i}", "question": "Where?", "answers": [{"text": f"x{i}", "answer_start": 0}]})
    for i in range(9):
        qas.append({"id": f"good{i}", "question": f"Where {i}?", "answers": [{"text": "Rome", "answer_start": 13}]})
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(doc), encoding="utf-8")
    out = tmp_path / "run"
    res = _cli("train", f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}", "train.max_steps=1",
               f"data.train_files=[{train_file}]", "data.on_error=skip", "data.dev_examples=0", "alignment.enabled=false",
               "prompts.length=0", "injection.length=2", "model.max_length=64", "model.doc_stride=16",
               "train.tensorboard=false", "eval.langs=[en]")
    assert res.returncode == 0, res.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert ("skipped 60 bad record(s) (data.on_error=skip): field 'text' is not in the context at answer_start x60 "
            "(e.g. data[0].paragraphs[0].qas[1] (id bad0) answers[0]: field 'text' 'x0' is not in the context") in log
    assert "x59" not in log  # one example per reason, not every record's text
    summary = json.loads((out / "train_summary.json").read_text())
    assert [(g["reason"], g["count"]) for g in summary["skipped_records"]] == [("field 'text' is not in the context at answer_start", 60)]


def test_every_training_record_skipped_stops_the_run_with_one_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_squad(answer_start=2)), encoding="utf-8")
    res = _cli("train", f"model.name_or_path={tiny_model_dir}", f"train.output_dir={tmp_path / 'run'}",
               f"data.train_files=[{bad}]", "data.on_error=skip", "alignment.enabled=false")
    assert "every record was skipped" in _one_error_line(res)


# ------------------------------------------------------------------------------ teacher cache on disk, through training


def test_disk_teacher_cache_is_written_by_training_and_reused(tmp_path):
    out = tmp_path / "run"
    align, probes = align_data()
    cfg = tiny_cfg(out, alignment={"enabled": True, "teacher_cache": "disk"}, train={"max_steps": 4, "save_every": 2})
    model = tiny_model(cfg)
    run_training(cfg, model, TrainData(task=qa_data(), align=align, align_probes=probes), quiet=True)
    files = list((out / "teacher_cache").glob("teacher-*.rank0.safetensors"))
    assert len(files) == 1
    stored = load_file(str(files[0]))
    assert stored["ids"].numel() == len(model.teacher_cache) > 0

    again = tiny_cfg(out, alignment={"enabled": True, "teacher_cache": "disk"}, train={"max_steps": 6, "save_every": 2, "resume": "auto"})
    second = tiny_model(again)
    assert len(second.teacher_cache) == stored["ids"].numel()  # read back before any forward
    run_training(again, second, TrainData(task=qa_data(), align=align, align_probes=probes), quiet=True)
    assert second.teacher_cache.teacher_forwards <= align.n - stored["ids"].numel()


# ------------------------------------------------------------------------------ the alignment probe


def test_probe_cosine_is_the_students_own_on_every_zero_stage(tmp_path):
    """The logged cosine equals one computed by hand from this probe's student and teacher forwards (ZeRO-0),
    and ZeRO-3 logs the same value for the same model."""
    import torch.nn.functional as F

    from dsxfer.training import engine as eng

    eng.init_distributed()
    _, probes = align_data()
    probe = {k: v[:, :6] if k.startswith(("align_tgt_input_ids", "align_tgt_attention_mask")) else v
             for k, v in probes["deu"].items()}  # target shorter than source: a mixed-up tensor cannot pass
    logged = {}
    for stage in (0, 3):
        ds_path = tmp_path / f"ds{stage}.json"
        ds_path.write_text(json.dumps(ds_json(stage)))
        cfg = tiny_cfg(tmp_path / "run", deepspeed={"config": str(ds_path)}, alignment={"enabled": True})
        ds = eng.build_ds_config(cfg, 1)
        engine, _, _ = eng.initialize(tiny_model(cfg, ds), cfg, ds)
        logged[stage] = engine.module.alignment_cosine(probe)
        if stage == 0:
            model = engine.module.eval()
            with torch.no_grad():
                student, n = model._encode(probe["align_tgt_input_ids"], probe["align_tgt_attention_mask"], None,
                                           prompted=True, hidden_states=True)
                teacher, _ = model._encode(probe["align_src_input_ids"], probe["align_src_attention_mask"], None,
                                           prompted=False, hidden_states=True)
            s_mask, t_mask = probe["align_tgt_attention_mask"].float(), probe["align_src_attention_mask"].float()
            s = (student.hidden_states[-1][:, n:] * s_mask[..., None]).sum(1) / s_mask.sum(1, keepdim=True)
            t = (teacher.hidden_states[-1] * t_mask[..., None]).sum(1) / t_mask.sum(1, keepdim=True)
            assert n == 3 and logged[0] == pytest.approx(float(F.cosine_similarity(s, t, dim=-1).mean()), abs=1e-5)
    assert logged[3] == pytest.approx(logged[0], abs=1e-5)
