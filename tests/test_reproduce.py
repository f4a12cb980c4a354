"""`dsxfer reproduce` and `dsxfer report` on its results folder, through the real command line.

The tiny suite (a random 4-layer XLM-R built by the harness, dsxfer LoRA and PEFT prompt tuning, 2 seeds,
k = 4) runs for real in subprocesses: a first grid is killed while a cell trains, the second continues it
(finished cells skipped, the killed cell redone from scratch), a third finds everything done. The report's
numbers are checked against a hand aggregation of the cells' result.json files.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dsxfer.cli"]
CELLS = ["qa-dsxfer_lora-k4-s1", "qa-peft_prompt-k4-s1", "qa-dsxfer_lora-k4-s2", "qa-peft_prompt-k4-s2"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _reproduce(out: Path, *extra: str, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "reproduce", "--suite", "tiny", "--out", str(out), *extra], capture_output=True, text=True,
                          cwd=REPO, env=_env(), timeout=timeout)


def _ids(path: Path) -> list[str]:
    doc = json.loads(path.read_text())
    return sorted(doc["ids"]) if isinstance(doc, dict) else sorted(doc)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """The tiny suite run as a user would: started, killed in its third cell, continued, then run once more."""
    out = tmp_path_factory.mktemp("results") / "tiny"
    first = subprocess.Popen([*CLI, "reproduce", "--suite", "tiny", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             cwd=REPO, env=_env(), start_new_session=True)
    third = out / "cells" / CELLS[2]
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:
        phase = third / "phase.txt"
        if phase.is_file() and phase.read_text().strip() == "training":
            break
        time.sleep(0.2)
    assert first.poll() is None, first.stdout.read().decode()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the grid and the cell it was running, mid-training
    first.wait()
    first.stdout.close()
    assert not (third / "result.json").exists()
    (third / "run" / "checkpoints" / "step-00000099").mkdir(parents=True, exist_ok=True)  # leftovers of the killed cell
    before = {c: (out / "cells" / c / "result.json").read_text() for c in CELLS[:2]}

    second = _reproduce(out)
    t = time.perf_counter()
    again = _reproduce(out, timeout=120)
    again_s = time.perf_counter() - t
    return {"out": out, "second": second, "again": again, "again_s": again_s, "before": before}


def test_a_killed_grid_continues_and_a_finished_grid_skips_every_cell(tiny_results):
    out, second, again = tiny_results["out"], tiny_results["second"], tiny_results["again"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "4 cells" in second.stdout and "2 finished earlier (skipped), 2 to run" in second.stdout, second.stdout
    for cell, text in tiny_results["before"].items():  # finished cells were not run again
        assert (out / "cells" / cell / "result.json").read_text() == text
    assert not (out / "cells" / CELLS[2] / "run" / "checkpoints" / "step-00000099").exists()  # the killed cell started over
    # the continued grid's ETAs count the cells the first grid finished (a dsxfer_lora cell among them)
    first_line = next(line for line in second.stdout.splitlines() if line.startswith(f"cell {CELLS[2]}: "))
    assert "cell ETA" in first_line, first_line
    assert again.returncode == 0, again.stderr[-2000:]
    assert "4 finished earlier (skipped), 0 to run" in again.stdout and "ran 0, skipped 4" in again.stdout, again.stdout
    assert tiny_results["again_s"] < 60


def test_every_cell_writes_a_complete_result(tiny_results):
    out = tiny_results["out"]
    for cell in CELLS:
        doc = json.loads((out / "cells" / cell / "result.json").read_text())
        assert doc["cell"] == cell and doc["k"] == 4 and doc["seed"] in (1, 2)
        assert set(doc["scores"]) == {"xquad", "mlqa"}
        for task in ("xquad", "mlqa"):
            assert set(doc["scores"][task]) == {"en", "de", "es"}
            for r in doc["scores"][task].values():
                assert 0.0 <= r["exact_match"] <= r["f1"] <= 100.0 and r["n_examples"] == 10
        assert doc["train"]["steps"] == 4 and doc["train"]["features_per_s"] > 0
        assert doc["peak_rss_mb"] > 100 and doc["wall_s"] > 0
        assert doc["config"]  # the resolved dsxfer config, or the peer's settings with the data config it shares


def test_peers_train_on_the_rows_dsxfer_trains_on_and_shots_are_not_evaluated(tiny_results):
    out = tiny_results["out"]
    for seed in (1, 2):
        ours, peer = out / "cells" / f"qa-dsxfer_lora-k4-s{seed}" / "run", out / "cells" / f"qa-peft_prompt-k4-s{seed}" / "run"
        for name in ("train_rows.json", "source_dev_ids.json"):
            assert _ids(ours / name) == _ids(peer / name), name
        shots = json.loads((ours / "shots.json").read_text())
        assert shots["ids"] == json.loads((peer / "shots.json").read_text())["ids"]
        shot_ids = {i for ids in shots["ids"].values() for i in ids}
        assert 0 < len(shot_ids) <= 8  # 4 per target language (a row id may be drawn for both)
        for cell in (ours.parent, peer.parent):
            for lang in ("en", "de", "es"):  # MLQA rows are translations: a shot in any language is out of every language
                predicted = set(json.loads((cell / "eval" / "mlqa" / f"predictions_{lang}.json").read_text()))
                assert len(predicted) == 10 and not predicted & shot_ids
            result = json.loads((cell / "result.json").read_text())
            assert result["scores"]["mlqa"]["de"]["excluded"] > 0  # counted, as the table shows


def _hand_stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.mean(values), statistics.stdev(values), min(values)


def test_report_numbers_equal_a_hand_aggregation_of_the_cells(tiny_results, tmp_path):
    out = tiny_results["out"]
    md_file = tmp_path / "docs" / "RESULTS.md"
    md_file.parent.mkdir()
    md_file.write_text("# Results\n\nkept text\n")
    r = subprocess.run([*CLI, "report", str(out), "-o", str(tmp_path / "report"), "--markdown", str(md_file)], capture_output=True,
                       text=True, cwd=REPO, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    cells = [json.loads((out / "cells" / c / "result.json").read_text()) for c in CELLS]
    agg = {(a["task"], a["metric"], a["k"], a["method"], a["lang"]): a for a in doc["aggregate"]}
    for task in ("xquad", "mlqa"):
        for method in ("dsxfer_lora", "peft_prompt"):
            mine = [c for c in cells if c["method"] == method]
            for lang in ("en", "de", "es"):
                mean, std, low = _hand_stats([c["scores"][task][lang]["f1"] for c in mine])
                a = agg[(task, "f1", 4, method, lang)]
                assert a["n_runs"] == 2 and math.isclose(a["mean"], mean) and math.isclose(a["std"], std) and math.isclose(a["min"], low)
                assert a["role"] == ("source" if lang == "en" else "target")
            # the average is over the target languages only, per cell, then over the seeds
            mean, std, low = _hand_stats([(c["scores"][task]["de"]["f1"] + c["scores"][task]["es"]["f1"]) / 2 for c in mine])
            a = agg[(task, "f1", 4, method, "avg")]
            assert math.isclose(a["mean"], mean) and math.isclose(a["std"], std) and math.isclose(a["min"], low)
            cell_text = f"{mean:.1f} ± {std:.1f} (min {low:.1f})"
            row = next(line for line in (tmp_path / "report" / "report.md").read_text().split(f"### {task}: F1")[1].splitlines()
                       if line.startswith(f"| {method} |"))
            assert cell_text in row and row.split(" | ")[1] == "2"
    eff = {e["method"]: e for e in doc["efficiency"]}
    assert math.isclose(eff["peft_prompt"]["peak_rss_mb"], statistics.mean(c["peak_rss_mb"] for c in cells if c["method"] == "peft_prompt"))
    for name in ("xquad_f1_k4_bars.png", "mlqa_f1_k4_bars.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "report").glob("*vs_k.png"))  # tiny has one k: no curve against k
    text = md_file.read_text()
    assert text.startswith("# Results\n\nkept text\n") and "<!-- dsxfer reproduce tiny: begin -->" in text
    assert "](../report/xquad_f1_k4_bars.png)" in text  # image links relative to the markdown file
    # a second report replaces the suite's section instead of adding another
    r = subprocess.run([*CLI, "report", str(out), "-o", str(tmp_path / "report"), "--markdown", str(md_file), "--no-plots"],
                       capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert md_file.read_text().count("<!-- dsxfer reproduce tiny: begin -->") == 1


def _cell(results: Path, method: str, k: int, seed: int, avg_parts: tuple[float, float], *, ablation_of: str | None = None,
          change: str | None = None) -> dict:
    """A cell result as dsxfer reproduce writes it (hand-made numbers)."""
    cell = f"qa-{method}-k{k}-s{seed}"
    de, es = avg_parts
    doc = {"cell": cell, "spec": {"ablation_of": ablation_of, "change": change, "about": method}, "config": {}, "method": method,
           "kind": "dsxfer", "task": "qa", "k": k, "seed": seed, "source_lang": "en",
           "scores": {"xquad": {"en": {"f1": 50.0, "exact_match": 40.0, "n_examples": 20, "excluded": 0},
                                "de": {"f1": de, "exact_match": de / 2, "n_examples": 20, "excluded": 0},
                                "es": {"f1": es, "exact_match": es / 2, "n_examples": 20, "excluded": 0}}},
           "train": {"steps": 10, "features_per_s": 5.0}, "peak_rss_mb": 1000.0, "wall_s": 60.0}
    folder = results / "cells" / cell
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(doc))
    return doc


def test_ablation_table_and_k_curves_from_hand_made_cells(tmp_path):
    from dsxfer.evaluation.report import write_grid_report

    results = tmp_path / "results"
    full = {0: [(30, 34), (32, 36), (31, 29)], 8: [(40, 42), (38, 44), (41, 39)]}
    no_align = {0: [(28, 30), (27, 31), (29, 33)], 8: [(36, 38), (37, 35), (35, 37)]}
    for k in (0, 8):
        for seed in range(3):
            _cell(results, "recipe", k, seed + 1, full[k][seed])
            _cell(results, "recipe_no_alignment", k, seed + 1, no_align[k][seed], ablation_of="recipe", change="without alignment")
    _cell(results, "recipe_w1", 0, 2, (35, 37), ablation_of="recipe", change="alignment.weight=1")  # one seed of the three
    # the grid lists the recipe's cells and one more that never ran; the ablation cells came from another grid
    expected = [f"qa-recipe-k{k}-s{s}" for k in (0, 8) for s in (1, 2, 3)] + ["qa-recipe-k32-s1"]
    (results / "grid.json").write_text(json.dumps({"suite": {"name": "hand"}, "cells": expected}))
    out = write_grid_report(results, tmp_path / "report")
    assert ("6 of 7 cells finished (not finished: qa-recipe-k32-s1), and 7 more cells of other grids in this folder "
            "(qa-recipe_no_alignment-k0-s1, ") in out["markdown"]
    abl = {(a["k"], a["method"]): a for a in out["ablation"] if a["task"] == "xquad" and a["metric"] == "f1"}
    for k in (0, 8):
        base = statistics.mean(sum(p) / 2 for p in full[k])
        ablated = [sum(p) / 2 for p in no_align[k]]
        a = abl[(k, "recipe_no_alignment")]
        assert math.isclose(a["mean"], statistics.mean(ablated)) and math.isclose(a["std"], statistics.stdev(ablated))
        assert math.isclose(a["delta"], statistics.mean(ablated) - base) and a["n_runs"] == 3
        assert a["change"] == "without alignment" and abl[(k, "recipe")]["delta"] == 0.0
        assert math.isclose(a["paired_delta"], statistics.mean(x - sum(f) / 2 for x, f in zip(ablated, full[k]))) and a["paired_seeds"] == [1, 2, 3]
    # a variant run on seed 2 only: the paired difference is against the method's seed 2 (34), not its 3-seed mean (32)
    w1 = abl[(0, "recipe_w1")]
    assert w1["n_runs"] == 1 and w1["paired_seeds"] == [2] and math.isclose(w1["paired_delta"], 36 - 34)
    assert math.isclose(w1["delta"], 36 - statistics.mean(sum(p) / 2 for p in full[0]))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| xquad | 8 | recipe_no_alignment | without alignment | 3 |" in md
    assert "| xquad | 0 | recipe_w1 | alignment.weight=1 | 1 | target avg | 36.0 | +4.0 | +2.0 (2) |" in md
    for name in ("xquad_f1_k0_bars.png", "xquad_f1_k8_bars.png", "xquad_f1_vs_k.png", "xquad_f1_std_vs_k.png"):
        assert (tmp_path / "report" / name).is_file()


def test_prompt_tuning_labels_are_shifted_onto_the_answer_token(tiny_model_dir):
    """PEFT's QA wrapper puts n virtual tokens before the window and reads start/end labels as indices into that
    longer sequence: unshifted they point n tokens early; shift_positions makes them point at the answer."""
    import torch
    import torch.nn.functional as F

    from dsxfer.data.readers import QAExample
    from dsxfer.peers import build_peer, featurize_windows, peer_predictor, shift_positions

    context = "Alice met Bob in Paris last summer."
    ex = QAExample(id="q1", title="t", context=context, question="Where did Alice meet Bob?", answers=["Paris"],
                   answer_starts=[context.index("Paris")], lang="en")
    n = 5
    model, tokenizer, n_virtual = build_peer("peft_prompt", str(tiny_model_dir), seed=0, prompt_tokens=n)
    assert n_virtual == n
    (window,) = featurize_windows([ex], tokenizer, 64, 16, with_labels=True)
    start, end = window["start_positions"], window["end_positions"]
    assert tokenizer.decode(window["input_ids"][start:end + 1]).strip() == "Paris"
    (shifted,) = shift_positions([window], n)
    assert (shifted["start_positions"], shifted["end_positions"]) == (start + n, end + n)

    seen = {}
    backbone = model.get_base_model().roberta
    backbone.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    ids = torch.tensor([window["input_ids"]])
    model.eval()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), start_positions=torch.tensor([start + n]),
                end_positions=torch.tensor([end + n]))
    words = backbone.embeddings.word_embeddings(ids)[0]
    sequence = seen["embeds"][0]  # what the backbone saw: n virtual tokens, then the window
    assert sequence.shape[0] == n + ids.shape[1]
    assert torch.equal(sequence[start + n], words[start]) and torch.equal(sequence[end + n], words[end])
    assert not torch.equal(sequence[start], words[start])  # the unshifted label points elsewhere (n tokens early)
    # PEFT's loss reads the labels as positions in that sequence
    by_hand = (F.cross_entropy(out.start_logits, torch.tensor([start + n])) + F.cross_entropy(out.end_logits, torch.tensor([end + n]))) / 2
    assert torch.allclose(out.loss, by_hand)
    # prediction drops the virtual columns: one logit per window token, aligned with the window
    predictor = peer_predictor(model, tokenizer, n, name="peft_prompt", model_name="tiny", max_length=64, doc_stride=16)
    s, e = predictor.predict({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert s.shape == ids.shape and torch.allclose(s, out.start_logits[:, n:]) and predictor.reserved_tokens == n


@pytest.mark.parametrize("args, message", [
    (["reproduce", "--suite", "tinyy"], "reproduce: unknown suite 'tinyy': choose one of tiny, small, probe, full or give a .yaml/.json suite file"),
    (["reproduce", "--suite", "tiny", "--methods", "peft_lora"], "reproduce: --methods: 'peft_lora' is not a method of suite tiny"),
])
def test_bad_reproduce_arguments_are_one_line(args, message, tmp_path):
    r = subprocess.run([*CLI, *args, "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"dsxfer: error: {message}"), r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_report_of_a_results_folder_without_finished_cells(tmp_path):
    (tmp_path / "res" / "cells" / "qa-x-k0-s1").mkdir(parents=True)
    (tmp_path / "res" / "grid.json").write_text("{}")
    r = subprocess.run([*CLI, "report", str(tmp_path / "res")], capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"dsxfer: error: {tmp_path / 'res'}: no finished cell (cells/*/result.json); "
                                f"run dsxfer reproduce --out {tmp_path / 'res'} first")


def test_every_cell_of_every_suite_is_a_valid_config_and_a_dry_run_writes_nothing(tmp_path):
    from dsxfer.config import load_config
    from dsxfer.reproduce import METHODS, SUITES, grid_cells, load_suite, run_grid, suite_methods

    files = sorted(str(p) for p in (REPO / "docs" / "results").glob("*/*.yaml"))  # the committed suites of the results
    assert any(f.endswith("tune/tune.yaml") for f in files)
    for name in [*SUITES, *files]:
        suite = load_suite(name)
        cells = grid_cells(suite)
        assert len(cells) == len({c["cell"] for c in cells})
        for c in [c for c in cells if c["seed"] == suite["seeds"][0]]:  # seeds differ only in train.seed
            cfg = load_config(None, c["config"] + [f"train.output_dir={tmp_path / 'x'}"])
            assert cfg.train.seed == c["seed"] and cfg.data.k_shot == c["k"] and cfg.train.lr == suite_methods(suite)[c["method"]]["lr"]
    small = load_suite("small")
    assert {"peft_lora", "peft_prompt", "dsxfer_lora"} <= set(small["methods"]) and len(small["methods"]) >= 4
    assert small["k"] == [0, 32] and len(small["seeds"]) == 3 and all(ev["max_examples"] >= 300 for ev in small["eval"].values())
    assert set(load_suite("full")["methods"]) == set(METHODS)
    done = run_grid("small", tmp_path / "out", dry_run=True, quiet=True)
    assert len(done["cells"]) == 36 and not (tmp_path / "out").exists()


def test_a_results_folder_in_use_by_another_grid_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "res"
    out.mkdir()
    with open(out / ".reproduce.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 (started 2026-12-01 10:00:00)")
        held.flush()
        r = subprocess.run([*CLI, "reproduce", "--suite", "tiny", "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                           env=_env(), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"dsxfer: error: reproduce: results folder {out} is in use by pid 4242 (started 2026-12-01 10:00:00): "
                                "wait for that grid to end, or choose another --out")
    assert not (out / "grid.json").exists() and not (out / "tiny-model").exists()


TUNE_SUITE = """\
about: tuning on the source dev hold-out (tiny model)
model: tiny
methods: [dsxfer_lora, dsxfer_lora_lr4, peft_prompt]
define:
  dsxfer_lora_lr4: {like: dsxfer_lora, lr: 4.0e-3}
k: [0]
seeds: [1]
targets: [de]
train: {questions: 40, dev_examples: 10, max_length: 128, stride: 32, steps: 4, batch: 4, warmup: 0.25, alignment_pairs: 32}
eval:
  source_dev: {max_examples: 10}
  xquad: {langs: [de], max_examples: 4}
prompt_tokens: 4
"""


def test_a_suite_defines_variants_and_scores_the_source_dev_hold_out(tmp_path):
    """A suite file of the shape a tuning grid has: a variant of dsxfer_lora defined in the file, scored (with the
    built-in method and a peer) on the source dev hold-out, reported as a variant of the method it is like."""
    from dsxfer.data.tasks import load_task
    from dsxfer.evaluation.metrics import qa_scores

    suite_file = tmp_path / "tune.yaml"
    suite_file.write_text(TUNE_SUITE)
    out = tmp_path / "tune"
    r = subprocess.run([*CLI, "reproduce", "--suite", str(suite_file), "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                       env=_env(), timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    gold = {ex.id: ex.answers for ex in load_task("tydiqa", "en", "train").items}
    f1 = {}
    for method in ("dsxfer_lora", "dsxfer_lora_lr4", "peft_prompt"):
        cell = out / "cells" / f"qa-{method}-k0-s1"
        doc = json.loads((cell / "result.json").read_text())
        dev_ids = sorted(json.loads((cell / "run" / "source_dev_ids.json").read_text()))
        assert len(dev_ids) == 10 and not set(dev_ids) & set(_ids(cell / "run" / "train_rows.json"))
        scored = doc["scores"]["source_dev"]["en"]
        predictions = json.loads((cell / "eval" / "source_dev" / "predictions_en.json").read_text())
        assert sorted(predictions) == dev_ids and scored["n_examples"] == 10
        hand = qa_scores({i: gold[i] for i in predictions}, predictions, "squad", "en")
        assert math.isclose(scored["f1"], hand["f1"], abs_tol=1e-4) and math.isclose(scored["exact_match"], hand["exact_match"], abs_tol=1e-4)
        assert set(doc["scores"]["xquad"]) == {"de"}
        f1[method] = scored["f1"]
        # a dsxfer run scored the whole hold-out at its kept step (4): the cell takes those files, no second pass;
        # the peer's Trainer scores no dev set, so its cell scores it
        step = json.loads((cell / "eval" / "source_dev" / "scores.json").read_text()).get("step")
        assert step == (None if method == "peft_prompt" else 4), (method, step)
    variant = json.loads((out / "cells" / "qa-dsxfer_lora_lr4-k0-s1" / "result.json").read_text())
    assert variant["config"]["train"]["lr"] == 4e-3 and variant["spec"]["ablation_of"] == "dsxfer_lora"

    r = subprocess.run([*CLI, "report", str(out), "-o", str(out / "report")], capture_output=True, text=True, cwd=REPO, env=_env(),
                       timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "report" / "report.json").read_text())
    row = next(a for a in doc["ablation"] if a["task"] == "source_dev" and a["method"] == "dsxfer_lora_lr4")
    assert row["of"] == "en (source)" and row["change"] == "lr 0.004" and row["n_runs"] == 1
    assert math.isclose(row["delta"], f1["dsxfer_lora_lr4"] - f1["dsxfer_lora"], abs_tol=1e-3)
    assert (out / "report" / "source_dev_f1_k0_bars.png").is_file()
    assert not (out / "report" / "source_dev_f1_vs_k.png").exists()  # no target average to draw against k


def test_a_source_dev_subset_is_scored_again_from_the_kept_weights(tmp_path):
    """max_examples below the hold-out: the subset is scored from the run's saved weights, and each prediction
    equals the one training wrote for that question when it kept those weights."""
    from dsxfer.config import load_config
    from dsxfer.reproduce import _source_dev_scores

    suite_file = tmp_path / "tune.yaml"
    suite_file.write_text(TUNE_SUITE.replace("methods: [dsxfer_lora, dsxfer_lora_lr4, peft_prompt]", "methods: [dsxfer_lora]")
                          .replace("  xquad: {langs: [de], max_examples: 4}\n", ""))
    out = tmp_path / "tune"
    r = subprocess.run([*CLI, "reproduce", "--suite", str(suite_file), "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                       env=_env(), timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cell = out / "cells" / "qa-dsxfer_lora-k0-s1"
    doc = json.loads((cell / "cell.json").read_text())
    cfg = load_config(None, doc["spec"]["config"] + [f"train.output_dir={cell / 'run'}", f"model.name_or_path={doc['model_path']}"])
    subset = _source_dev_scores(cfg, cell / "run", tmp_path / "subset", None, 6)["en"]
    again = json.loads((tmp_path / "subset" / "predictions_en.json").read_text())
    kept = json.loads((cell / "run" / "source_dev" / "predictions_en.json").read_text())
    assert subset["n_examples"] == 6 and sorted(again) == sorted(kept)[:6]
    assert again == {i: kept[i] for i in again}
    assert "step" not in json.loads((tmp_path / "subset" / "scores.json").read_text())  # scored here, not taken


@pytest.mark.parametrize("define, message", [
    ({"lora_x": {"like": "lora"}}, "suite s: define.lora_x: field 'like' names the method it varies: one of peft_lora"),
    ({"dsxfer_lora": {"like": "dsxfer_lora"}}, "suite s: define.dsxfer_lora: 'dsxfer_lora' is a built-in method"),
    ({"p": {"like": "peft_lora", "overrides": ["alignment.weight=1"]}},
     "suite s: define.p: peft_lora is a peer (PEFT + the HF Trainer): a variant of it can change its lr only"),
    ({"v": {"like": "lora_recipe", "overrides": ["alignment.wieght=1"]}}, "alignment.wieght"),
    ({"v": {"like": "lora_recipe", "lr": "fast"}}, "suite s: define.v: lr 'fast' is not a number"),
    ({"v": {"like": "lora_recipe", "seed": 3}}, "suite s: define.v: unknown field 'seed'"),
])
def test_bad_variant_definitions_are_named(define, message, tmp_path):
    import yaml

    from dsxfer.errors import ConfigError
    from dsxfer.reproduce import SUITES, load_suite

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SUITES["tiny"], "define": define}))
    with pytest.raises(ConfigError) as e:
        load_suite(str(path))
    assert message in str(e.value)
