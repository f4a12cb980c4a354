"""Free heap pages go back to the OS once per optimizer step (dsxfer.training.memory), in a fresh process.

The training loop's RSS grew because freed activations of varying shapes stayed in glibc's heap as
holes below blocks still in use. The script builds exactly that state, deterministically: 300 MB of
100 KB tensors (below the mmap threshold, so from the heap), one small tensor allocated after them (the
heap's top stays in use), then the 300 MB freed. Without release_free_memory the process keeps them.
"""

import subprocess
import sys
import textwrap

from dsxfer.training.memory import release_free_memory

SCRIPT = textwrap.dedent("""
    import sys, torch
    from dsxfer.training.memory import release_free_memory
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    base = rss()
    blocks = [torch.ones(25_000) for _ in range(3000)]   # 100 KB each: heap, not mmap; 300 MB in all
    pin = torch.ones(16)                                   # allocated after them: the heap's top stays in use
    del blocks                                             # freed, but in the middle of the heap
    if sys.argv[1] == "release":
        release_free_memory()
    print(rss() - base)
""")


def held_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip())


def test_releasing_free_memory_returns_the_heap_holes_that_freed_activations_leave():
    assert release_free_memory()  # glibc: the allocator whose growth this bounds
    kept, released = held_mb("keep"), held_mb("release")
    assert kept > 200, kept  # without the call the freed 300 MB stay resident
    assert released < 0.1 * kept, (released, kept)
