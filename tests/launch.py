"""What the tests that start processes share: a fresh launch environment and a free port.

A test process may carry rank variables from an earlier in-process run (dsxfer's one-process world sets
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or from a Slurm job the suite runs in; a child
launched as a user launches it must see neither, or it would join a world that is not there.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "SLURM_")


def launch_env(**extra: str) -> dict[str, str]:
    """os.environ without the rank and Slurm variables, one OpenMP thread per process, then `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VARIABLES)}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_workspaces(port: int) -> list[str]:
    """DeepSpeed CPU all-reduce segments in /dev/shm that a launch on `port` left behind."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
