"""bench/cpu_train.py --smoke: the dsxfer-vs-PEFT+Trainer benchmark runs end to end (a tiny random
model, 2 timed steps, 1 repeat, real subprocesses for both runners) and prints both tables with their
dsxfer/peer ratio columns filled from measured numbers."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "cpu_train.py"


def _rows(text: str, title: str) -> list[list[str]]:
    """The markdown table printed after the line starting with `title`, as rows of cells (header first)."""
    block = text.split(title, 1)[1].strip().split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines() if not line.startswith("|---")]


def test_smoke_prints_training_and_evaluation_tables_with_ratios(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for title, ratio_header in (("Training", "dsxfer/peer samples/s (min / median / max)"),
                                ("Evaluation", "dsxfer/peer model loop (min / median / max)")):
        header, *rows = _rows(proc.stdout, title)
        assert ratio_header in header
        ratio = header.index(ratio_header)
        runners = {row[1]: row for row in rows if row[0] == "lora"}
        assert set(runners) == {"dsxfer", "PEFT LoRA"}, rows
        # the ratio cell holds min / median / max of positive measured ratios
        values = [float(v) for v in re.findall(r"[0-9.]+", runners["dsxfer"][ratio])]
        assert len(values) == 3 and all(v > 0 for v in values) and values[0] <= values[1] <= values[2]
        assert float(runners["PEFT LoRA"][2]) > 0  # the peer's own measurement (samples/s or features)
    # real tokens are counted per timed step for each runner: a mean per window inside (0, max_length], and
    # samples/s x tokens/window = tokens/s
    header, *rows = _rows(proc.stdout, "Training")
    assert "dsxfer/peer real tokens/s (min / median / max)" in header
    col = {name: header.index(name) for name in ("samples/s", "real tokens/window", "real tokens/s")}
    max_length = int(re.search(r"windows (\d+) / stride", proc.stdout).group(1))
    for row in (r for r in rows if r[0] == "lora"):
        per_window = float(row[col["real tokens/window"]])
        assert 0 < per_window <= max_length, row
        assert abs(float(row[col["samples/s"]]) * per_window - float(row[col["real tokens/s"]])) <= 0.02 * float(row[col["real tokens/s"]]) + 1
    # both runners trained in their own process and left their run folders
    assert (tmp_path / "run-dsxfer-lora" / "train.log").is_file()
    assert (tmp_path / "lora-peer-0.json").is_file()


def test_profile_of_one_step_prints_the_split_and_the_operators():
    script = SCRIPT.parent / "profile_step.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--method", "prefix_topk_cached"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "method prefix_topk_cached" in proc.stdout
    for part in ("forward", "backward", "optimizer"):
        assert re.search(rf"^  {part} +[0-9.]+ s$", proc.stdout, re.M), part
    assert "Self CPU" in proc.stdout
