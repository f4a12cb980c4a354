"""launchers/slurm/train.sbatch on a real Slurm cluster: munged, slurmctld and slurmd started on this
machine as a one-node cluster (a generated slurm.conf in a temporary folder), the real script
submitted with sbatch for a 3-step two-rank run in both launch modes.

Opt in with `-m slurm` (`.ci/run` runs it after `make test`). slurm-wlm and munge are installed with
apt-get when missing (needs root). Where the daemons cannot start, the tests are skipped with the
daemons' log tail as the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launch import free_port

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launchers" / "slurm" / "train.sbatch"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "scontrol", "scancel")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return f"({path.name}: no log)"
    return f"{path.name}: " + " | ".join(path.read_text(errors="replace").splitlines()[-lines:])


def _install_slurm() -> None:
    """apt-get install slurm-wlm and munge when a daemon or client is missing; skip when that cannot be done."""
    missing = [b for b in (*DAEMONS, *CLIENTS) if _which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0 or _which("apt-get") is None:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing) and apt-get as root is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]):
        res = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` failed (exit {res.returncode}): {(res.stdout + res.stderr)[-1500:]}")
    still = [b for b in (*DAEMONS, *CLIENTS) if _which(b) is None]
    if still:
        pytest.skip(f"slurm-wlm and munge installed, but {', '.join(still)} not found")


SLURM_CONF = """\
# a one-node test cluster on this machine; every path is in this folder
ClusterName=dsxfertest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# finished jobs stay visible to `scontrol show job` for 10 minutes (there is no accounting database)
MinJobAge=600
# trust the CPU count below even where the machine reports fewer cores
SlurmdParameters=config_overrides
SlurmdTimeout=300
KillWait=5
MailProg=/bin/true
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    dir: Path
    env: dict[str, str]
    host: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def logs(self) -> str:
        return "; ".join(_tail(self.dir / name) for name in ("munged.log", "slurmctld.log", "slurmd.log"))

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged: each started here, stopped by its own id
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def _start(cluster: Cluster, name: str, *args: str) -> subprocess.Popen:
    log = open(cluster.dir / f"{name}.out", "w")
    proc = subprocess.Popen([_which(name), *args], env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    cluster.procs.append(proc)
    return proc


def _skip_unstarted(cluster: Cluster, what: str) -> None:
    cluster.stop()
    outs = "; ".join(_tail(p, 5) for p in sorted(cluster.dir.glob("*.out")))
    pytest.skip(f"the Slurm daemons cannot start on this machine ({what}): {cluster.logs()}; {outs}")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    _install_slurm()
    folder = tmp_path_factory.mktemp("slurm")
    folder.chmod(0o700)  # munged refuses a key or socket in a folder that others may write
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    munge_socket = folder / "munge.sock"
    conf.write_text(SLURM_CONF.format(host=host, dir=folder, munge_socket=munge_socket, ctld_port=free_port(),
                                      slurmd_port=free_port(), cpus=max(2, os.cpu_count() or 1)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(conf)
    cluster = Cluster(folder, env, host)

    key = folder / "munge.key"
    res = cluster.run(_which("mungekey"), "--create", f"--keyfile={key}")
    if res.returncode != 0:
        _skip_unstarted(cluster, f"mungekey failed: {res.stderr.strip()}")
    munged = _start(cluster, "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                    f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
                    f"--seed-file={folder / 'munged.seed'}")
    deadline = time.monotonic() + 20
    while not munge_socket.exists() and munged.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not munge_socket.exists():
        _skip_unstarted(cluster, "munged did not open its socket")
    slurmctld = _start(cluster, "slurmctld", "-D", "-c", "-f", str(conf))
    slurmd = _start(cluster, "slurmd", "-D", "-f", str(conf), "-N", host)

    deadline = time.monotonic() + 90
    state = ""
    while time.monotonic() < deadline:
        if slurmctld.poll() is not None or slurmd.poll() is not None:
            _skip_unstarted(cluster, f"slurmctld exit {slurmctld.poll()}, slurmd exit {slurmd.poll()}")
        res = cluster.run(_which("sinfo"), "-h", "-N", "-o", "%N %T")
        state = res.stdout.strip() or res.stderr.strip()
        if res.returncode == 0 and re.fullmatch(rf"{re.escape(host)} idle", state):
            break
        time.sleep(1)
    else:
        _skip_unstarted(cluster, f"node not idle after 90 s (sinfo: {state!r})")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm_model_dir(tmp_path_factory):
    """A tiny randomly initialised XLM-R backbone (130 positions) and its small fast tokenizer, saved as an HF folder."""
    from tiny import save_tiny_folder, subword_backbone

    return save_tiny_folder(tmp_path_factory.mktemp("tiny_xlmr"), *subword_backbone("xlm-roberta", max_position_embeddings=130))


def _run_config(path: Path, model_dir: Path, run_dir: Path) -> Path:
    from dsxfer.data import resolve_data_dir

    path.write_text(f"""\
name: slurm test
model: {{name_or_path: {model_dir}, max_length: 64, doc_stride: 16}}
prompts: {{length: 2}}
injection: {{length: 2, layers: all, reparam: false}}
alignment: {{enabled: false}}
data: {{data_dir: {resolve_data_dir()}, train_task: tydiqa, max_train_examples: 16, dev_examples: 4, k_shot: 0}}
train: {{output_dir: {run_dir}, max_steps: 3, micro_batch_size: 2, warmup_steps: 0, log_every: 1, save_every: 0, tensorboard: false}}
eval: {{tasks: [xquad], langs: [de]}}
""")
    return path


def _job_field(record: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", record)
    return match.group(1) if match else "?"


@pytest.mark.parametrize("launch_mode", ["torchrun", "srun"])
def test_sbatch_runs_two_ranks_on_a_real_slurm(slurm_cluster, slurm_model_dir, tmp_path, launch_mode):
    run_dir = tmp_path / "run"
    config = _run_config(tmp_path / "tiny.yaml", slurm_model_dir, run_dir)
    env = {**slurm_cluster.env, "LAUNCH_MODE": launch_mode, "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHON", None)
    if sys.prefix != sys.base_prefix:  # submit as from a shell with this venv activated: the script must find it
        env.update(VIRTUAL_ENV=sys.prefix, PATH=f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env['PATH']}")
        expected_python = str(Path(sys.prefix) / "bin" / "python")
    else:
        env["PYTHON"] = expected_python = sys.executable
    output = tmp_path / "job-%j.out"
    t0 = time.monotonic()
    submit = subprocess.run([_which("sbatch"), "--parsable", "--wait", f"--output={output}", str(SBATCH),
                             "--deepspeed", "ds_configs/zero2.json", "--config", str(config)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - t0
    job_id = submit.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch did not submit: {submit.stdout} {submit.stderr}; {slurm_cluster.logs()}"
    job_out = tmp_path / f"job-{job_id}.out"
    out_text = job_out.read_text(errors="replace") if job_out.exists() else "(no job output)"
    record = slurm_cluster.run(_which("scontrol"), "show", "job", job_id).stdout
    state, exit_code = _job_field(record, "JobState"), _job_field(record, "ExitCode")
    print(f"job {job_id} ({launch_mode}): JobState={state} ExitCode={exit_code} after {seconds:.0f} s")
    assert submit.returncode == 0 and (state, exit_code) == ("COMPLETED", "0:0"), \
        f"job {job_id}: JobState={state} ExitCode={exit_code}, sbatch exit {submit.returncode}\n{out_text[-4000:]}"

    launch_line = next(line for line in out_text.splitlines() if line.startswith("train.sbatch: "))
    print(launch_line)
    assert launch_line.startswith(f"train.sbatch: 1 node(s) x 2 CPU rank(s) = world size 2, mode {launch_mode}, ")
    assert launch_line.endswith(f"python {expected_python}")
    log = (run_dir / "train.log").read_text()
    world_line = next(line for line in log.splitlines() if "world size" in line)
    print(world_line)
    assert "world size 2 (rank 0)" in world_line
    assert "done: max_steps at step 3" in log, log[-2000:]
    checkpoint = run_dir / "checkpoints" / "step-00000003"
    assert checkpoint.is_dir() and any(checkpoint.iterdir()), sorted(p.name for p in run_dir.rglob("*"))
    assert (run_dir / "trainable.safetensors").is_file()
