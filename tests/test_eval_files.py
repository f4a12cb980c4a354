"""`dsxfer eval` on the user's own files, a run's own training rows left out, and `dsxfer score`.

Files are written to tmp_path in the real formats (SQuAD JSON, PAWS-X TSV with and without header,
JSONL); models are tiny random ones, so the scores test the plumbing, never quality.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dsxfer.cli import main
from dsxfer.data import load_task, save_shots, task_file
from dsxfer.errors import DataError
from dsxfer.evaluation.evaluate import run_eval, subset
from dsxfer.evaluation.metrics import qa_scores

DSXFER = str(Path(sys.executable).parent / "dsxfer")


def _squad_file(path: Path, examples) -> Path:
    """A SQuAD v1.1-format file holding exactly these questions (one paragraph each)."""
    data = [{"title": f"t{i}", "paragraphs": [{"context": ex.context, "qas": [
        {"id": ex.id, "question": ex.question,
         "answers": [{"text": t, "answer_start": s} for t, s in zip(ex.answers, ex.answer_starts)]}]}]}
        for i, ex in enumerate(examples)]
    path.write_text(json.dumps({"version": "1.1", "data": data}, ensure_ascii=False), encoding="utf-8")
    return path


def _trained_run(tmp_path: Path, tiny: Path, task: str = "qa") -> Path:
    """A run folder as training leaves it (config.yaml + trainable.safetensors) around a tiny model."""
    from dsxfer.config import load_config
    from dsxfer.method.model import CONFIG_FILE, build_transfer_model

    cfg = load_config(None, [f"model.name_or_path={tiny}", f"model.task={task}", "prompts.length=2", "injection.length=2",
                             "alignment.enabled=false", "model.max_length=128", "model.doc_stride=32", "name=tiny-run"])
    model = build_transfer_model(cfg).eval()
    run = tmp_path / "run"
    model.save_trainable(run)
    (run / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
    return run


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("dsxfer: error: ") and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------------------------ own files


def test_eval_on_own_qa_files_names_each_file(tiny_xlmr, tmp_path, capsys):
    de = _squad_file(tmp_path / "my_questions.json", load_task("xquad", "de").items[:7])
    en_rows = load_task("mlqa", "en").items[:5]
    jsonl = tmp_path / "more_questions.jsonl"
    jsonl.write_text("".join(json.dumps({"id": f"q{i}", "context": ex.context, "question": ex.question, "answers": [
        {"text": ex.answers[0], "answer_start": ex.answer_starts[0]}]}) + "\n" for i, ex in enumerate(en_rows)), encoding="utf-8")
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(tiny_xlmr), "--file", str(de), "--lang", "de", "--file", str(jsonl), "--lang", "en",
               "-o", str(out), "--batch_size", "8", "--max_length", "128"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(de) in printed and str(jsonl) in printed
    assert not any(name in printed for name in ("XQuAD", "MLQA", "PAWS-X"))
    doc = json.loads((out / "scores.json").read_text())
    assert doc["task"] == "qa" and doc["files"] == [f"{de}:de", f"{jsonl}:en"]
    first, second = doc["results"]
    assert (first["task"], first["lang"], first["file"], first["data"], first["predictions"], first["n_examples"]) == (
        "my_questions.json", "de", str(de), str(de), "predictions_my_questions.json", 7)
    assert (second["task"], second["lang"], second["predictions"], second["n_examples"]) == (
        "more_questions.jsonl", "en", "predictions_more_questions.json", 5)
    assert "excluded" not in first  # no run, nothing to leave out
    gold = {ex.id: ex for ex in load_task("xquad", "de").items[:7]}
    preds = json.loads((out / "predictions_my_questions.json").read_text(encoding="utf-8"))
    assert set(preds) == set(gold) and all(v in gold[k].context for k, v in preds.items())
    expected = qa_scores({k: ex.answers for k, ex in gold.items()}, preds, "squad")
    assert first["f1"] == pytest.approx(expected["f1"], abs=1e-4) and first["exact_match"] == pytest.approx(expected["exact_match"], abs=1e-4)
    assert set(json.loads((out / "predictions_more_questions.json").read_text())) == {f"q{i}" for i in range(5)}

    # dsxfer score reads the prediction file back and gets the same numbers with the same metric code
    assert main(["score", str(out / "predictions_my_questions.json"), "--file", str(de), "--lang", "de", "-o", str(tmp_path / "s")]) == 0
    (scored,) = json.loads((tmp_path / "s" / "scores.json").read_text())["results"]
    assert (scored["f1"], scored["exact_match"], scored["missing"]["count"], scored["extra"]["count"]) == (
        first["f1"], first["exact_match"], 0, 0)


def test_eval_on_own_pair_files_from_the_config(tiny_xlmr, tmp_path, capsys):
    headerless = tmp_path / "pairs_de.tsv"  # the XTREME layout: no header, the row index is the id
    headerless.write_text("".join(line + "\n" for line in task_file("pawsx", "de").read_text(encoding="utf-8").split("\n")[:12]),
                          encoding="utf-8")
    en = load_task("pawsx", "en").items[:6]
    with_header = tmp_path / "pairs_en.tsv"  # the original layout, UTF-8 without BOM
    with_header.write_text("id\tsentence1\tsentence2\tlabel\n" + "".join(
        f"row-{i}\t{ex.sentence1}\t{ex.sentence2}\t{ex.label}\n" for i, ex in enumerate(en)), encoding="utf-8")
    jsonl = tmp_path / "pairs_fr.jsonl"
    fr = load_task("pawsx", "fr").items[:5]
    jsonl.write_text("".join(json.dumps({"id": f"fr{i}", "sentence1": ex.sentence1, "sentence2": ex.sentence2, "label": ex.label},
                                        ensure_ascii=False) + "\n" for i, ex in enumerate(fr)), encoding="utf-8")
    config = tmp_path / "eval.yaml"
    config.write_text(f"eval:\n  files: ['{headerless}:de', '{with_header}:en']\n  batch_size: 4\n", encoding="utf-8")
    out = tmp_path / "out"
    # the config's eval.files plus one more entry from a dotted override (which replaces the list)
    assert main(["eval", "--config", str(config), "--model", str(tiny_xlmr), "-o", str(out),
                 f"eval.files={headerless}:de,{with_header}:en,{jsonl}:fr"]) == 0
    printed = capsys.readouterr().out
    assert "PAWS-X" not in printed and all(str(p) in printed for p in (headerless, with_header, jsonl))
    doc = json.loads((out / "scores.json").read_text())
    assert doc["task"] == "classification"
    results = {r["lang"]: r for r in doc["results"]}
    expected_ids = {"de": [str(i) for i in range(12)], "en": [f"row-{i}" for i in range(6)], "fr": [f"fr{i}" for i in range(5)]}
    labels = {"de": [int(line.rsplit("\t", 1)[1]) for line in headerless.read_text(encoding="utf-8").splitlines()],
              "en": [ex.label for ex in en], "fr": [ex.label for ex in fr]}
    for lang, r in results.items():
        preds = json.loads((out / r["predictions"]).read_text())
        assert list(preds) == expected_ids[lang] and set(preds.values()) <= {0, 1}
        correct = sum(preds[i] == y for i, y in zip(expected_ids[lang], labels[lang]))
        assert r["accuracy"] == pytest.approx(100 * correct / len(labels[lang]), abs=1e-4)
        assert r["metric"] == "accuracy" and r["data"] == r["file"]


@pytest.mark.parametrize("args, message", [
    (["--file", "{tmp}/notes.txt", "--lang", "de"], "cannot tell the format from the extension '.txt'"),
    (["--file", "{tmp}/q.json", "--lang", "de", "--file", "{tmp}/p.tsv", "--lang", "de"],
     "evaluate QA files and sentence-pair files in separate runs"),
    (["--file", "{tmp}/q.json", "--file", "{tmp}/p.tsv", "--lang", "de"], "2 --file but 1 --lang: give one --lang after each --file"),
    (["--lang", "de"], "--lang names the language of a --file; for a benchmark task use --langs"),
    (["--file", "{tmp}/q.json", "--lang", "de", "--langs", "de,es"], "with --file give one --lang per file"),
    (["eval.files={tmp}/q.json"], "eval.files entry '{tmp}/q.json' is not 'PATH:LANG'"),
    (["--task", "pawsx", "--file", "{tmp}/q.json", "--lang", "de"], "holds QA records, but the task or model here is classification"),
    (["--task", "mlqa", "--file", "{tmp}/q.json", "--lang", "fr"], "the MLQA metric is defined for en, es, de, ar, hi, vi, zh, not 'fr'"),
    (["--file", "{tmp}/missing.json", "--lang", "de"], "missing.json: file not found"),
])
def test_bad_eval_files_fail_before_a_model_loads(tmp_path, capsys, args, message):
    _squad_file(tmp_path / "q.json", load_task("xquad", "de").items[:2])
    (tmp_path / "p.tsv").write_text("a\tb\t1\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("x\n", encoding="utf-8")
    # the model folder does not exist: reaching the model would be a different error
    argv = ["eval", "--model", str(tmp_path / "no-model"), "-o", str(tmp_path / "out"), *[a.format(tmp=tmp_path) for a in args]]
    assert main(argv) == 2
    assert message.format(tmp=tmp_path) in _one_line(capsys)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------- a run's own training rows


def test_mlqa_eval_of_a_run_leaves_out_its_shots_and_source_rows(tiny_xlmr, tmp_path, capsys):
    run = _trained_run(tmp_path, tiny_xlmr)
    de_ids = sorted(ex.id for ex in load_task("mlqa", "de"))
    rng = random.Random(0)
    shots = rng.sample(de_ids, 5)
    source = rng.sample(sorted(set(de_ids) - set(shots)), 3)
    save_shots(run / "shots.json", {"de": shots}, task="mlqa", k=5, seed=0)  # as training writes them
    (run / "train_rows.json").write_text(json.dumps({"task": "mlqa", "ids": source}))
    out = tmp_path / "out"
    assert main(["eval", "--task", "mlqa", "--langs", "de,es", "--run_dir", str(run), "--max_examples", "15", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "de: excluded 5 of the 5-shot mlqa rows (shots.json); 3 of the mlqa source training rows (train_rows.json)" in printed
    results = {r["lang"]: r for r in json.loads((out / "scores.json").read_text())["results"]}
    banned = set(shots) | set(source)
    de = results["de"]
    assert de["excluded"] == {"count": 8, "by_source": {"5-shot mlqa rows (shots.json)": 5,
                                                         "mlqa source training rows (train_rows.json)": 3}}
    assert de["data"] == "MLQA dev subset of 15 (8 rows the run trained on excluded)" and de["n_examples"] == 15
    preds = json.loads((out / "predictions_de.json").read_text(encoding="utf-8"))
    assert not set(preds) & banned
    # the seeded subset is drawn from the rows that remain, as if the trained rows had never been there
    assert set(preds) == {ex.id for ex in subset([ex for ex in load_task("mlqa", "de") if ex.id not in banned], 15, seed=0)}
    # MLQA rows share ids across languages: the Spanish versions of the trained rows are left out too
    es_ids = {ex.id for ex in load_task("mlqa", "es")}
    assert results["es"]["excluded"]["count"] == len(es_ids & banned) > 0
    assert not set(json.loads((out / "predictions_es.json").read_text(encoding="utf-8"))) & banned
    # another task keeps all its rows, and says so
    doc = run_eval("xquad", "de", run_dir=str(run), max_examples=3, output_dir=tmp_path / "xq", progress=False)
    assert doc["results"][0]["excluded"] == {"count": 0, "by_source": {}} and doc["results"][0]["data"] == "XQuAD subset of 3"


def test_eval_refuses_only_when_every_row_asked_for_was_trained_on(tiny_xlmr, tmp_path, capsys):
    run = _trained_run(tmp_path, tiny_xlmr)
    shot_rows = load_task("mlqa", "de").items[:4]
    save_shots(run / "shots.json", {"de": shot_rows}, task="mlqa", k=4, seed=0)
    copy = _squad_file(tmp_path / "shots_copy.json", shot_rows)
    # the file is declared MLQA: its rows are the run's shots and nothing else, so there is nothing to evaluate
    with pytest.raises(DataError, match=r"shots_copy.json: all 4 rows are rows the run .* trained on \(4-shot mlqa rows"):
        run_eval("mlqa", files=[(str(copy), "de")], run_dir=str(run), output_dir=tmp_path / "o", progress=False)
    # undeclared, it is the user's own data: evaluated in full, with a warning that names the coincidence
    assert main(["eval", "--file", str(copy), "--lang", "de", "--run_dir", str(run), "-o", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "warning: 4 row id(s) of" in printed and "pass --task mlqa to leave them out" in printed
    (r,) = json.loads((tmp_path / "o" / "scores.json").read_text())["results"]
    assert r["n_examples"] == 4 and r["excluded"]["count"] == 0 and "pass --task mlqa" in r["warning"]


def test_training_records_its_rows_and_eval_of_the_run_leaves_them_out(tiny_xlmr, tmp_path, capsys):
    from dsxfer.config import load_config
    from dsxfer.training.train import train

    run = tmp_path / "run"
    cfg = load_config(None, [
        f"model.name_or_path={tiny_xlmr}", "model.max_length=96", "model.doc_stride=32", "prompts.length=0",
        "injection.length=2", "injection.reparam=false", "alignment.enabled=false",
        "data.train_task=mlqa", "data.source_lang=en", "data.max_train_examples=12", "data.dev_examples=2",
        "data.shot_task=mlqa", "data.k_shot=3", "data.target_langs=de", "eval.tasks=xquad", "eval.langs=en",
        "train.max_steps=2", "train.micro_batch_size=4", "train.warmup_steps=0", "train.log_every=1",
        "train.tensorboard=false", f"train.output_dir={run}"])
    train(cfg, quiet=True)
    rows = json.loads((run / "train_rows.json").read_text())
    assert rows["task"] == "mlqa" and len(rows["ids"]) == 12
    shots = json.loads((run / "shots.json").read_text())["ids"]["de"]
    capsys.readouterr()
    assert main(["eval", "--task", "mlqa", "--langs", "de", "--run_dir", str(run), "--max_examples", "6", "-o", str(tmp_path / "o")]) == 0
    (r,) = json.loads((tmp_path / "o" / "scores.json").read_text())["results"]
    de_ids = {ex.id for ex in load_task("mlqa", "de")}
    assert r["excluded"]["by_source"] == {"3-shot mlqa rows (shots.json)": 3,
                                          "mlqa source training rows (train_rows.json)": len(de_ids & set(rows["ids"]))}
    assert not set(json.loads((tmp_path / "o" / "predictions_de.json").read_text())) & (set(shots) | set(rows["ids"]))


# --------------------------------------------------------------------------------- dsxfer score


def _gold_file(tmp_path: Path) -> Path:
    """Four hand-written questions; the expected scores below are computed by hand."""
    def q(qid, question, answers, context):
        return {"id": qid, "question": question, "answers": [{"text": a, "answer_start": context.index(a)} for a in answers]}

    c1 = "The Eiffel Tower in Paris, France was finished in 1889."
    c2 = "Der Rhein fließt durch Basel."
    data = [{"title": "t", "paragraphs": [
        {"context": c1, "qas": [q("q1", "What was finished?", ["The Eiffel Tower"], c1),
                                q("q2", "Where is it?", ["Paris, France"], c1),
                                q("q3", "When?", ["1889", "in 1889"], c1)]},
        {"context": c2, "qas": [q("q4", "Welcher Fluss?", ["Der Rhein"], c2)]}]}]
    path = tmp_path / "gold.json"
    path.write_text(json.dumps({"version": "1.1", "data": data}, ensure_ascii=False), encoding="utf-8")
    return path


def _score(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DSXFER, "score", *args], capture_output=True, text=True, timeout=120)


def test_score_matches_hand_computed_em_and_f1(tmp_path):
    gold = _gold_file(tmp_path)
    preds = tmp_path / "predictions.json"
    # q1 exact after normalisation (article, case); q2 half the gold tokens; q3 equals the second gold answer;
    # q4 has no prediction; 'zzz' is not a gold id
    preds.write_text(json.dumps({"q1": "eiffel tower", "q2": "Paris", "q3": "in 1889", "zzz": "x"}), encoding="utf-8")
    r = _score(str(preds), "--file", str(gold), "--lang", "de", "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    # EM = (1 + 0 + 1 + 0) / 4; F1 = (1 + 2/3 + 1 + 0) / 4   (q2: precision 1, recall 1/2)
    (row,) = json.loads((tmp_path / "out" / "scores.json").read_text())["results"]
    assert row["exact_match"] == 50.0 and row["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 4, abs=1e-4)
    assert row["metric"] == "squad" and row["n_examples"] == 4 and row["task"] == "gold.json"
    assert row["missing"] == {"count": 1, "examples": ["q4"]} and row["extra"] == {"count": 1, "examples": ["zzz"]}
    assert "50.00       66.67" in r.stdout
    assert "missing: 1 of 4 gold ids have no prediction and score 0 (as in the official scripts), e.g. q4" in r.stdout
    assert "extra: 1 prediction(s) for ids not in the gold data were ignored, e.g. zzz" in r.stdout

    # the MLQA metric drops German articles: "Rhein" matches "Der Rhein" for de, not under SQuAD v1.1
    preds.write_text(json.dumps({"q1": "x", "q2": "x", "q3": "x", "q4": "Rhein"}), encoding="utf-8")
    squad = _score(str(preds), "--file", str(gold), "--lang", "de", "-o", str(tmp_path / "squad"))
    mlqa = _score(str(preds), "--file", str(gold), "--lang", "de", "--task", "mlqa", "-o", str(tmp_path / "mlqa"))
    assert squad.returncode == mlqa.returncode == 0, (squad.stderr, mlqa.stderr)
    (s,) = json.loads((tmp_path / "squad" / "scores.json").read_text())["results"]
    (m,) = json.loads((tmp_path / "mlqa" / "scores.json").read_text())["results"]
    # SQuAD: q4 F1 = 2 * (1 * 1/2) / (1 + 1/2) = 2/3 of one question in four
    assert (s["exact_match"], m["exact_match"]) == (0.0, 25.0)
    assert s["f1"] == pytest.approx(100 * (2 / 3) / 4, abs=1e-4) and m["f1"] == 25.0 and m["metric"] == "mlqa"


def test_score_a_benchmark_language_and_a_pair_file(tmp_path, capsys):
    de = load_task("xquad", "de").items
    preds = {ex.id: ex.answers[0] for ex in de[:7]} | {ex.id: "zzzz" for ex in de[7:10]}
    path = tmp_path / "predictions_de.json"
    path.write_text(json.dumps(preds, ensure_ascii=False), encoding="utf-8")
    assert main(["score", str(path), "--task", "xquad", "--lang", "de", "-o", str(tmp_path / "out")]) == 0
    (row,) = json.loads((tmp_path / "out" / "scores.json").read_text())["results"]
    # 7 right of 1190 questions; the 1180 without a prediction count 0, as the official script does
    assert row["exact_match"] == row["f1"] == round(100 * 7 / 1190, 4) and row["missing"]["count"] == 1180
    assert row["data"] == "XQuAD" and "1180 of 1190 gold ids have no prediction" in capsys.readouterr().out

    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a b\tc d\t1\ne f\tg h\t0\ni j\tk l\t1\nm n\to p\t0\n", encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps({"0": 1, "1": 1, "2": "1"}))  # row 3 missing: wrong
    assert main(["score", str(tmp_path / "p.json"), "--file", str(tsv), "--lang", "xx", "-o", str(tmp_path / "cls")]) == 0
    (row,) = json.loads((tmp_path / "cls" / "scores.json").read_text())["results"]
    assert row["accuracy"] == 50.0 and row["missing"]["examples"] == ["3"]


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "top level is a list, not an object: a prediction file is {question_id: answer_text}"),
    ('{"56beb4343aeaaa14008c925b": 3}', "the prediction for id '56beb4343aeaaa14008c925b' is 3, not an answer text"),
    ('{"a": "x", "b": "y"}', "none of its 2 ids is a question of XQuAD (de), e.g. a, b"),
    ('{"a": ', "line 1 column 7: not valid JSON"),
])
def test_score_errors_are_one_line(tmp_path, capsys, content, message):
    (tmp_path / "p.json").write_text(content, encoding="utf-8")
    assert main(["score", str(tmp_path / "p.json"), "--task", "xquad", "--lang", "de"]) == 2
    assert message in _one_line(capsys)
