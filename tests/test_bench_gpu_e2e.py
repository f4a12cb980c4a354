"""bench/gpu_e2e.py --smoke: the GPU end-to-end benchmark runs its real path on a CPU. A random Llama is
built and saved, the DeepSpeed launcher trains the shipped GPU config's full method on it under ZeRO-3
(world size 1), and the printed table holds the medians of the training log's own step lines."""

import hashlib
import statistics
import subprocess
import sys
from pathlib import Path

from launch import launch_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_e2e.py"


def _log_windows(train_log: Path) -> list[dict[str, float]]:
    """The step lines of a training log, read by splitting on '|' (not the script's regex)."""
    windows = []
    for line in train_log.read_text().splitlines():
        if not (line.startswith("step ") and "samples/s" in line):
            continue
        parts = [p.strip() for p in line.split("|")]
        speed = next(p for p in parts if "samples/s" in p)  # "2.53 samples/s, 404 tokens/s, MFU 0.06%"
        samples_part, tokens_part, mfu_part = speed.split(", ")
        samples, tokens, mfu = float(samples_part.split()[0]), float(tokens_part.split()[0]), float(mfu_part.split()[1].rstrip("%"))
        peak = float(next(p for p in parts if p.startswith("peak memory")).split()[2])
        windows.append({"step": int(parts[0].split()[1]), "samples": samples, "tokens": tokens, "mfu": mfu, "peak": peak})
    return windows


def test_smoke_trains_a_decoder_under_zero3_through_the_launcher_and_tables_the_log(tmp_path):
    perf_before = hashlib.sha256((ROOT / "docs" / "PERF.md").read_bytes()).hexdigest()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work_dir", str(tmp_path)], cwd=ROOT,
                          env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train_log = tmp_path / "run" / "train.log"
    text = train_log.read_text()
    assert "world size 1 (rank 0), ZeRO-3" in text and "done: max_steps at step 4" in text
    assert "cos deu" in text  # the alignment loss of the shipped config ran (its probe cosines are logged)
    assert (tmp_path / "run" / "trainable.safetensors").is_file()

    windows = _log_windows(train_log)
    assert [w["step"] for w in windows] == [1, 2, 3, 4]
    timed = windows[1:]  # the first window holds start-up
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| random Llama"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "3 (world size 1)" and cells[3] == "fp32" and cells[4] == "2 x 128" and cells[5] == "3 (4)"
    assert float(cells[6].split()[0]) == round(statistics.median(w["samples"] for w in timed), 2)
    assert float(cells[7].split()[0]) == round(statistics.median(w["tokens"] for w in timed))
    assert float(cells[8].split("%")[0]) == round(statistics.median(w["mfu"] for w in timed), 2)
    assert float(cells[9]) == round(max(w["peak"] for w in windows))
    # the smoke run writes nothing into docs/
    assert hashlib.sha256((ROOT / "docs" / "PERF.md").read_bytes()).hexdigest() == perf_before
