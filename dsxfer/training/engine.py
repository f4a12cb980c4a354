"""DeepSpeed engine: process environment, ds-config checks, initialisation, optimizer-side checks.

Only the trainable parameters (prompts, prefixes, head, adapters, unfrozen layers) go into a client
`torch.optim.AdamW`; the frozen backbone is never seen by the optimizer, so it costs no optimizer
state, and under ZeRO-3 it is only partitioned. A client torch optimizer needs no compiled DeepSpeed
op, which is what makes the same code run on a CPU (gloo) and on GPUs (nccl).

The DeepSpeed JSON files in ds_configs/ hold no "auto" values. The batch geometry and precision come
from dsxfer's config: a field the JSON leaves out is filled from it, a field the JSON states must agree
with it (micro batch, gradient accumulation, world size, precision, clipping), or we stop with one
line saying which value to change.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dsxfer.errors import ConfigError
from dsxfer.method import trainable
from dsxfer.method.schedule import warmup_then_decay

# ------------------------------------------------------------------------------------ processes

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_")


def launch_env(**extra: str) -> dict[str, str]:
    """os.environ without the rank and Slurm variables, then `extra`: the environment in which a process that may
    itself be a rank (an in-process run sets them) or a Slurm job starts a launcher, whose ranks must not join
    a world that is not there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARIABLES)}
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it): a launcher's --master_port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_env() -> dict[str, int]:
    """Make RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT exist, whatever started us.

    deepspeed and torchrun set them; srun sets SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, which we
    map; plain `python` sets nothing, so we make a one-process world on localhost.
    """
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env.setdefault("RANK", "0")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        # a one-process world lets the OS pick a free port as it binds (0: no race with other processes
        # for a port probed earlier); a multi-process world must be told one
        env["MASTER_PORT"] = "0" if env["WORLD_SIZE"] == "1" else "29500"
    return {"rank": int(env["RANK"]), "local_rank": int(env["LOCAL_RANK"]), "world_size": int(env["WORLD_SIZE"])}


SHM_DIR = Path("/dev/shm")


def init_distributed() -> dict[str, int]:
    """Set the environment and start torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU)."""
    info = init_process_env()
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(verbose=False)
        _unlink_shm_workspace(info["rank"])
        atexit.register(shutdown_distributed)
    return info


def shutdown_distributed() -> None:
    """End distributed work while the interpreter is still whole (registered at exit by init_distributed).

    gloo runs collectives on C++ worker threads. A worker that drops the last reference to a tensor
    after interpreter finalization has begun needs the GIL to free it, cannot have it, and the rank
    aborts with "terminate called without an active exception" (SIGABRT) after its work is done:
    the launcher then reports the whole run as failed (pytorch/pytorch#190489). So: destroy the
    groups (their threads are joined when no engine holds them any more), collect what only cycles
    kept alive, and give the workers still releasing finished work a moment with the GIL free.
    Calling it again, or without a group, does nothing.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.destroy_process_group()
    gc.collect()
    time.sleep(0.2)


def shm_workspace_name(rank: int) -> str:
    """The name DeepSpeed's CPU all-reduce gives the shared-memory workspace of `rank` (shm.cpp)."""
    env = os.environ
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"


def _unlink_shm_workspace(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed shared-memory workspace once every rank has mapped it.

    When all ranks are on one machine (the launcher sets LOCAL_SIZE == WORLD_SIZE), DeepSpeed's CPU
    communication op creates a 66 MB segment per rank in /dev/shm, maps its peers' segments while
    `init_distributed` runs, and never unlinks them: each 2-rank run left 132 MB of RAM behind, for
    good, until a machine running many of them (a test suite, a sweep) was out of memory. After the
    barrier every rank holds its mappings, so the names are no longer needed; unlinking them now
    keeps the memory alive exactly as long as the processes, even when they are killed.
    """
    env = os.environ
    if env.get("LOCAL_SIZE") != env.get("WORLD_SIZE"):  # DeepSpeed's own test: the same on every rank
        return
    barrier()
    with contextlib.suppress(FileNotFoundError):
        (SHM_DIR / shm_workspace_name(rank)).unlink()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_ranks_max(value: float) -> float:
    """The largest value over all ranks (every rank must call it)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def broadcast_text(text: str) -> str:
    """Rank 0's `text` on every rank (every rank must call it)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return text
    box = [text]
    torch.distributed.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def _comm_device() -> torch.device:
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------ ds config

def _precision_of(ds: dict[str, Any]) -> str:
    enabled = [name for name in ("bf16", "fp16") if isinstance(ds.get(name), dict) and ds[name].get("enabled") is True]
    if len(enabled) > 1:
        raise ConfigError("DeepSpeed config enables both bf16 and fp16: enable at most one")
    return enabled[0] if enabled else "fp32"


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _find_auto(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            hit = _find_auto(v, f"{path}.{k}" if path else k)
            if hit:
                return hit
    elif node == "auto":
        return path
    return None


def load_ds_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config not found: {p} (use one of ds_configs/zero0.json .. zero3_offload.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {p} is not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {p} must be a JSON object")
    return data


def build_ds_config(cfg, world: int, ds: dict[str, Any] | None = None, source: str = "") -> dict[str, Any]:
    """The DeepSpeed config dict for this run: the JSON (or a ZeRO-0 default) checked and completed.

    `cfg` is an ExperimentConfig; `world` the number of ranks. Raises ConfigError on any disagreement.
    """
    if ds is None:
        if cfg.deepspeed.config:
            source = str(cfg.deepspeed.config)
            ds = load_ds_json(source)
        else:
            source, ds = "<built-in ZeRO-0>", {"zero_optimization": {"stage": 0}}
    ds = json.loads(json.dumps(ds))  # a private copy: we fill it in
    where = f"DeepSpeed config {source}" if source else "DeepSpeed config"
    auto = _find_auto(ds)
    if auto:
        raise ConfigError(f"{where}: {auto} is \"auto\"; dsxfer uses explicit values: remove the key (dsxfer fills it from its config) or write the value")
    if "optimizer" in ds:
        raise ConfigError(f"{where} has an \"optimizer\" section: dsxfer passes its own AdamW over the trainable parameters; remove the section and set train.lr / train.weight_decay instead")
    if "scheduler" in ds:
        raise ConfigError(f"{where} has a \"scheduler\" section: dsxfer schedules the learning rate itself; remove it and set train.scheduler / train.warmup_steps")

    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    expected = {
        "train_micro_batch_size_per_gpu": (micro, "train.micro_batch_size"),
        "gradient_accumulation_steps": (accum, "train.grad_accum"),
        "train_batch_size": (micro * accum * world,
                             f"train.micro_batch_size x train.grad_accum x world size = {micro} x {accum} x {world}"),
        "gradient_clipping": (float(cfg.train.grad_clip), "train.grad_clip"),
    }
    for key, (value, origin) in expected.items():
        if key in ds:
            stated = ds[key]
            if not isinstance(stated, (int, float)) or isinstance(stated, bool) or float(stated) != float(value):
                raise ConfigError(f"{where}: {key}={stated!r} disagrees with dsxfer's {origin} = {value}; "
                                  f"change one of them (or remove {key} from the JSON and dsxfer fills it in)")
        else:
            ds[key] = value

    precision = cfg.deepspeed.precision
    stated = _precision_of(ds)
    has_section = any(isinstance(ds.get(k), dict) and "enabled" in ds[k] for k in ("bf16", "fp16"))
    if has_section and stated != precision:
        raise ConfigError(f"{where} trains in {stated} but deepspeed.precision={precision}; make them agree "
                          f"(set deepspeed.precision={stated}, or change the JSON's bf16/fp16 \"enabled\")")
    if precision != "fp32":
        ds.setdefault(precision, {})["enabled"] = True

    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage={stage} is invalid: use 0, 1, 2 or 3")
    ds.setdefault("steps_per_print", 10**9)  # our own log is the progress record
    ds.setdefault("wall_clock_breakdown", False)
    return ds


# ------------------------------------------------------------------------------------ schedules


def lr_lambda(scheduler: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step `s`: linear warm-up, then linear/cosine/constant.

    `dsxfer.method.schedule.warmup_then_decay` with offset 1: step 0 already applies lr / warmup_steps
    (the module docstring there says why the alignment weight counts from 0 instead).
    """
    decay = {"constant": "none", "linear": "linear", "cosine": "cosine"}.get(scheduler)

    def f(s: int) -> float:
        if decay is None:
            raise ConfigError(f"config value train.scheduler={scheduler!r} is invalid: use linear, cosine or constant")
        return warmup_then_decay(s, peak=1.0, warmup_steps=warmup_steps, total_steps=max_steps, decay=decay, offset=1)
    return f


# ------------------------------------------------------------------------------------ engine


@contextlib.contextmanager
def zero3_construction(ds: dict[str, Any]) -> Iterator[None]:
    """Build the model inside this context so a ZeRO-3 run partitions the backbone while it loads.

    transformers reads the global HfDeepSpeedConfig and then creates weights under deepspeed.zero.Init
    (each rank only ever holds its shard). The HfDeepSpeedConfig must stay alive while the model is
    built, and transformers' model modules must be imported before zero.Init patches module creation.
    Outside ZeRO-3 this is a no-op.
    """
    if zero_stage(ds) != 3:
        yield
        return
    init_distributed()  # zero.Init needs the process group; without RANK etc. DeepSpeed would try MPI discovery
    import transformers.models.auto.modeling_auto  # noqa: F401  (imported before zero.Init, see above)
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def initialize(model: nn.Module, cfg, ds: dict[str, Any]):
    """deepspeed.initialize with a client AdamW over the trainable parameters and our LR schedule.

    Returns (engine, optimizer, lr_scheduler). Parameters frozen later (never) or unfrozen later (gradual
    unfreezing) are handled by `add_trainable`.
    """
    import deepspeed

    params = [p for _, p in trainable.parameters(model)]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen (enable prompts.length, injection.length, adapters.lora or a freezing strategy)")
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.scheduler, cfg.train.warmup_steps, cfg.train.max_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds, dist_init_required=False)
    if zero_stage(ds) == 3:
        _register_shared_parameters(engine.module)
    return engine, optimizer, scheduler


def _register_shared_parameters(model: nn.Module) -> None:
    """ZeRO-3: keep prompt-injection parameters gathered for the whole forward of the model.

    Without reparameterisation the injection module hands its parameters themselves to the attention
    modules of the backbone; ZeRO-3 would release them when the injection's own forward returns.
    Registered as external parameters of the top module they stay gathered until its forward ends.
    """
    import deepspeed

    injection = getattr(model, "injection", None)
    if injection is None:
        return
    for p in injection.parameters():
        deepspeed.zero.register_external_parameter(model, p)


def add_trainable(engine, new_names: list[str]) -> bool:
    """Make a ZeRO-0 client optimizer see newly unfrozen parameters; False when the stage cannot grow.

    ZeRO 1-3 flatten the trainable set at initialisation; the caller then rebuilds the engine.
    """
    if not new_names:
        return True
    if engine.zero_optimization_stage() != 0:
        return False
    params = dict(engine.module.named_parameters())
    optimizer = engine.optimizer
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    group["params"] = [params[n] for n in new_names]
    optimizer.add_param_group(group)
    sched = engine.lr_scheduler
    if sched is not None and hasattr(sched, "lr_lambdas"):
        sched.lr_lambdas.append(sched.lr_lambdas[0])
        sched.base_lrs.append(group.get("initial_lr", optimizer.param_groups[0].get("initial_lr", group["lr"])))
    return True


def trainable_is_finite(module: nn.Module) -> bool:
    """True when no trainable value is NaN/Inf on any rank: one all-reduce of a flag, no copies.

    Each rank looks at what it holds: the full parameters under ZeRO 0-2, its own shard under ZeRO-3.
    """
    local = [getattr(p, "ds_tensor", p) for _, p in trainable.parameters(module)]
    flags = [torch.isfinite(t).all() for t in local if t.numel()]
    finite = bool(torch.stack(flags).all()) if flags else True  # one device sync
    return all_ranks_max(0.0 if finite else 1.0) == 0.0


def grad_norm_before_step(engine) -> float | None:
    """Norm of the trainable gradients, computed before engine.step() where DeepSpeed does not (ZeRO-0)."""
    if engine.zero_optimization_stage() != 0:
        return None
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def global_grad_norm(engine, before_step: float | None) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = before_step
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
