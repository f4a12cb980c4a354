"""Launchers: the Slurm script's launch logic on a simulated two-node allocation, SLURM_* rank mapping,
the --dry-run command, and launchers/train.py's error path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launch import free_port, launch_env

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launchers" / "slurm" / "train.sbatch"

# What every rank runs: join the gloo group from the environment the launcher gave it, all_reduce.
ALLREDUCE = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from dsxfer.training.engine import init_process_env
info = init_process_env()
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
with open(os.path.join({out!r}, f"rank{{dist.get_rank()}}.txt"), "w") as f:
    f.write(f"{{dist.get_rank()}} {{dist.get_world_size()}} {{int(t.item())}} {{os.environ['MASTER_ADDR']}} {{info['local_rank']}}")
dist.destroy_process_group()
"""


def _wait(procs, timeout: float = 120) -> list[str]:
    """Outputs of the processes; on a hang, stop them (each started by this test, by its own id)."""
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs.append(f"timed out after {timeout} s: " + (p.communicate()[0] or ""))
    return logs


def _fake_scontrol(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/usr/bin/env bash\n# fake: a two-node allocation that is this machine twice\n'
                        '[ "$1 $2" = "show hostnames" ] || exit 1\necho localhost\necho localhost\n')
    scontrol.chmod(0o755)
    return bin_dir


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return launch_env(**{"PATH": f"{_fake_scontrol(tmp_path)}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]",
                          "SLURM_NNODES": "2", "PYTHON": sys.executable, **extra})


def test_sbatch_two_simulated_nodes_rendezvous(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE.format(root=str(ROOT), out=str(out)))
    env = _slurm_env(tmp_path, GPUS_PER_NODE="1", MASTER_PORT=str(free_port()), TRAIN_SCRIPT=str(script))
    procs = [subprocess.Popen(["bash", str(SBATCH), "--node"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**env, "SLURM_NODEID": str(n), "SLURM_PROCID": str(n)}, text=True) for n in (0, 1)]
    logs = _wait(procs)
    assert [p.returncode for p in procs] == [0, 0], logs
    results = sorted((out / f"rank{r}.txt").read_text().split() for r in (0, 1))
    # two ranks, one per simulated node, met at the host scontrol named and summed 1 + 2
    assert results == [["0", "2", "3", "localhost", "0"], ["1", "2", "3", "localhost", "0"]]


def _dry_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), "--dry-run", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


def test_sbatch_dry_run_prints_the_exact_commands(tmp_path):
    env = _slurm_env(tmp_path, GPUS_PER_NODE="4", MASTER_PORT="29611", SLURM_CPUS_ON_NODE="16")
    env.pop("OMP_NUM_THREADS")
    args = ["--deepspeed", "ds_configs/zero3.json", "--config", "configs/xquad_fewshot.yaml", "train.lr=1e-3"]
    res = _dry_run(env, *args)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == (f"# 2 node(s) x 4 GPU rank(s) = world size 8, mode torchrun, rendezvous localhost:29611, "
                        f"OMP_NUM_THREADS=4, python {sys.executable}")
    # one launcher task per node, holding the CPUs of all the node's ranks
    assert lines[1].split() == ["srun", "--nodes", "2", "--ntasks", "2", "--ntasks-per-node", "1", "--cpus-per-task", "16",
                                "--export=ALL", "--kill-on-bad-exit=1", "bash", f"{ROOT}/launchers/slurm/train.sbatch", "--node", *args]
    assert lines[3].split() == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "4",
                                "--node_rank", "\\$SLURM_NODEID", "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:29611",
                                "--rdzv_id", "dsxfer", "launchers/train.py", *args]
    # srun mode: every rank is an srun task; the counts are explicit, so the batch allocation's one task
    # per node (SLURM_NTASKS=2, read by srun) does not shrink the world
    res = _dry_run({**env, "LAUNCH_MODE": "srun", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1"}, *args)
    assert res.stdout.splitlines()[1].split() == ["srun", "--nodes", "2", "--ntasks", "8", "--ntasks-per-node", "4",
                                                  "--cpus-per-task", "4", "--export=ALL", "--kill-on-bad-exit=1",
                                                  sys.executable, "launchers/train.py", *args]
    outside = {k: v for k, v in env.items() if k != "SLURM_JOB_NODELIST"}
    res = _dry_run(outside)
    assert res.returncode == 2 and "not inside a Slurm allocation" in res.stderr


def _summary(env: dict[str, str]) -> str:
    res = _dry_run(env)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()[0]


def test_sbatch_ranks_per_node_come_from_the_gpus_slurm_allocated(tmp_path):
    env = _slurm_env(tmp_path, MASTER_PORT="29611", SLURM_NNODES="1", SLURM_CPUS_ON_NODE="6")
    for var in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "GPUS_PER_NODE", "CPU_RANKS_PER_NODE"):
        env.pop(var, None)
    assert _summary({**env, "SLURM_GPUS_ON_NODE": "3"}).startswith(
        "# 1 node(s) x 3 GPU rank(s) = world size 3, mode torchrun, rendezvous localhost:29611, OMP_NUM_THREADS=2,")
    assert " x 2 GPU rank(s) = world size 2," in _summary({**env, "CUDA_VISIBLE_DEVICES": "0,1"})
    # no GPU: CPU ranks over gloo, 2 unless CPU_RANKS_PER_NODE says otherwise; threads share the node's CPUs
    assert " x 2 CPU rank(s) = world size 2, " in _summary(env) and "OMP_NUM_THREADS=3," in _summary(env)
    assert " x 3 CPU rank(s) = world size 3, " in _summary({**env, "CPU_RANKS_PER_NODE": "3"})
    assert " x 2 CPU rank(s) " in _summary({**env, "CUDA_VISIBLE_DEVICES": ""})
    res = _dry_run({**env, "LAUNCH_MODE": "mpirun"})
    assert res.returncode == 2 and res.stderr.strip() == "train.sbatch: error: LAUNCH_MODE=mpirun is not one of torchrun, srun"
    res = _dry_run({**env, "CPU_RANKS_PER_NODE": "0"})
    assert res.returncode == 2 and "CPU_RANKS_PER_NODE=0 is not a positive whole number" in res.stderr


def test_sbatch_defaults_to_the_python_of_the_submitting_environment(tmp_path):
    env = _slurm_env(tmp_path, MASTER_PORT="29611")
    env.pop("PYTHON")
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        env.pop(var, None)
    venv = tmp_path / "submitter-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    assert _summary({**env, "VIRTUAL_ENV": str(venv)}).endswith(f"python {venv}/bin/python")
    # no venv active: the checkout's .venv (what `make install` creates), else python3 on PATH
    checkout = tmp_path / "checkout"
    (checkout / ".venv").mkdir(parents=True)
    (checkout / ".venv" / "bin").symlink_to(venv / "bin")
    assert _summary({**env, "SLURM_SUBMIT_DIR": str(checkout)}).endswith(f"python {checkout}/.venv/bin/python")
    bare = tmp_path / "bare"
    bare.mkdir()
    python3 = subprocess.run(["bash", "-c", "command -v python3"], env=env, capture_output=True, text=True).stdout.strip()
    assert _summary({**env, "SLURM_SUBMIT_DIR": str(bare)}).endswith(f"python {python3}")
    assert _summary({**env, "PYTHON": "/opt/x/bin/python", "VIRTUAL_ENV": str(venv)}).endswith("python /opt/x/bin/python")


def test_sbatch_refuses_an_interpreter_without_the_dsxfer_stack(tmp_path):
    """Outside --dry-run the script checks the interpreter before srun starts anything."""
    venv = tmp_path / "no-torch"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    env = _slurm_env(tmp_path, MASTER_PORT="29611", SLURM_SUBMIT_DIR=str(ROOT), PYTHON=str(venv / "bin" / "python"))
    res = subprocess.run(["bash", str(SBATCH), "--config", "configs/demo.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == (f"train.sbatch: error: {venv}/bin/python cannot import torch, deepspeed and dsxfer: "
                                  "activate the dsxfer venv before sbatch, or set PYTHON=/path/to/bin/python")


def test_srun_style_ranks_are_mapped_from_slurm_variables(tmp_path):
    """srun starts the ranks itself: SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS become RANK / LOCAL_RANK / WORLD_SIZE."""
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "allreduce.py"
    script.write_text(ALLREDUCE.format(root=str(ROOT), out=str(out)))
    env = _slurm_env(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), SLURM_NTASKS="2")
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = _wait(procs)
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sorted((out / f"rank{r}.txt").read_text() for r in (0, 1)) == ["0 2 3 127.0.0.1 0", "1 2 3 127.0.0.1 1"]


def test_launcher_reports_a_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n")
    res = subprocess.run([sys.executable, "launchers/train.py", "--config", str(bad), "--deepspeed", "ds_configs/zero2.json"],
                         cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["dsxfer: error: config value train.lr='fast' is invalid: expected a number"]
