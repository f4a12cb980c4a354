"""What the tests that start processes share: a fresh launch environment and a free port.

A test process may carry rank variables from an earlier in-process run (dsxfer's one-process world sets
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or from a Slurm job the suite runs in; a child
launched as a user launches it must see neither, or it would join a world that is not there.
"""

from __future__ import annotations

from pathlib import Path

from dsxfer.training.engine import free_port, launch_env as _launch_env

__all__ = ["free_port", "launch_env", "shm_workspaces"]


def launch_env(**extra: str) -> dict[str, str]:
    """os.environ without the rank and Slurm variables, one OpenMP thread per process, then `extra`."""
    return _launch_env(**{"OMP_NUM_THREADS": "1", **extra})


def shm_workspaces(port: int) -> list[str]:
    """DeepSpeed CPU all-reduce segments in /dev/shm that a launch on `port` left behind."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
