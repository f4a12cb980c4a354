"""Resident memory stays flat over steps of varying shapes (dsxfer.training.memory), in a fresh process."""

import subprocess
import sys
import textwrap

from dsxfer.training.memory import release_free_memory

SCRIPT = textwrap.dedent("""
    import random, sys, torch
    from dsxfer.training.memory import release_free_memory
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    rng, kept, start = random.Random(0), [], None
    for step in range(150):
        x = torch.randn(8, rng.randint(20, 192), 384)          # a batch padded to its own length
        ys = [torch.relu(x @ torch.ones(384, 1536)) for _ in range(4)]
        del x, ys
        kept.append(torch.ones(rng.randint(10, 500)))          # small long-lived tensors in between
        if sys.argv[1] == "release":
            release_free_memory()
        if step == 9:
            start = rss()
    print(rss() - start)
""")


def grown_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip())


def test_releasing_free_memory_each_step_keeps_rss_flat_over_varying_shapes():
    assert release_free_memory()  # glibc: the allocator whose growth this bounds
    without, with_release = grown_mb("keep"), grown_mb("release")
    assert without > 100, without  # the growth the training loop saw: freed activations stay in the heap
    assert with_release < 0.2 * without, (with_release, without)
