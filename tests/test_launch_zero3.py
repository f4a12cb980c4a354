"""The users' entry point under ZeRO-3 on two CPU ranks: `deepspeed --num_gpus 2 launchers/train.py ...`.

Every shipped config runs its first steps (a tiny model, the bundled data), and the full method (soft
prompt + prefix injection + alignment) survives `kill -9` of one rank after a checkpoint: the resumed run
ends with trainable weights bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import free_port, launch_env, shm_workspaces

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

pytestmark = pytest.mark.distributed


def _tiny(model_dir: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that keep a shipped config's method and shrink its budget to seconds."""
    return [f"model.name_or_path={model_dir}", f"train.output_dir={out}", "model.max_length=128", "model.doc_stride=32",
            "data.max_train_examples=12", "data.dev_examples=3", "alignment.max_pairs=8", "alignment.batch_size=4",
            "injection.reparam_hidden=16", "train.micro_batch_size=2", "train.log_every=1", "train.eval_every=0",
            "train.early_stopping_patience=0", "train.tensorboard=false", *extra]


def _launch(config: Path, overrides: list[str]) -> subprocess.Popen:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           "launchers/train.py", "--deepspeed", "ds_configs/zero3.json", "--config", str(config), *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.port = port
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks this test started
        out = "timed out\n" + proc.communicate()[0]
    # DeepSpeed's CPU all-reduce never unlinks its 66 MB segment per rank; dsxfer does, right after
    # start-up, so that no run, finished or killed, leaves memory behind in /dev/shm
    assert not shm_workspaces(proc.port), shm_workspaces(proc.port)
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_runs_under_zero3_on_two_ranks(config, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    proc = _launch(config, _tiny(tiny_model_dir, out, "train.max_steps=3", "data.k_shot=2"))
    log = _finish(proc)
    assert proc.returncode == 0, log[-4000:]
    train_log = (out / "train.log").read_text()
    assert "world size 2" in train_log and "ZeRO-3" in train_log
    assert "step 3 | loss" in train_log and "done: max_steps at step 3" in train_log
    from dsxfer.config import load_config

    if load_config(config).alignment.enabled:  # the probe cosines of every language reach the log
        for lang in load_config(config).alignment.target_langs:
            assert f"cos {lang} " in train_log, lang
    assert (out / "trainable.safetensors").is_file()


def _rank_pid(out: Path, rank: int) -> int | None:
    """The pid of the rank process of this run (its command line names the output folder)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--local_rank={rank}".encode() in cmd and f"train.output_dir={out}".encode() in cmd:
            return int(proc.name)
    return None


def test_full_method_survives_kill_of_one_rank_and_resumes_bitwise(tmp_path, tiny_model_dir):
    config = ROOT / "configs" / "xquad_fewshot.yaml"  # soft prompt 16 + prefixes in all layers + InfoNCE alignment
    budget = ["train.max_steps=12", "train.save_every=3", "train.keep_last=2", "train.warmup_steps=2",
              "alignment.warmup_steps=4", "data.k_shot=2", "data.target_langs=[de]", "alignment.target_langs=[deu,spa]",
              "eval.langs=[en,de]"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    # the uninterrupted reference and the run to be killed start together (start-up is most of their time)
    uninterrupted = _launch(config, _tiny(tiny_model_dir, full, *budget))
    interrupted = _launch(config, _tiny(tiny_model_dir, cut, *budget))
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "step-00000003").is_dir():  # a complete checkpoint exists
        assert interrupted.poll() is None and time.time() < deadline, _finish(interrupted)[-4000:]
        time.sleep(0.01)
    victim = _rank_pid(cut, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    log = _finish(interrupted)
    assert interrupted.returncode != 0, "the run ended before rank 1 was killed: " + log[-2000:]
    assert "done:" not in (cut / "train.log").read_text()
    log = _finish(uninterrupted)
    assert uninterrupted.returncode == 0, log[-4000:]

    resumed = _launch(config, _tiny(tiny_model_dir, cut, *budget, "train.resume=auto"))
    log = _finish(resumed)
    assert resumed.returncode == 0, log[-4000:]
    train_log = (cut / "train.log").read_text()
    assert "resumed from" in train_log and "done: max_steps at step 12" in train_log
    a, b = load_file(str(full / "trainable.safetensors")), load_file(str(cut / "trainable.safetensors"))
    assert set(a) == set(b) and {k for k in a if k.startswith("prompt.")} and {k for k in a if k.startswith("injection.")}
    for name in a:
        assert torch.equal(a[name], b[name]), name
