"""Evaluation around a predict callable; HF models with a fresh head; `dsxfer eval` end to end."""

import json

import numpy as np
import pytest
import torch
from transformers import LlamaModel, XLMRobertaModel

from dsxfer.cli import main
from dsxfer.data import featurize_qa, load_task, task_file
from dsxfer.errors import DataError
from dsxfer.evaluation.evaluate import (
    build_hf_model, evaluate_classification, evaluate_qa, held_out_rows, hf_predictor, load_predictor, run_eval, subset,
)
from tiny import char_tokenizer, decoder_tokenizer, encoder_tokenizer, save_tiny_folder, subword_backbone


def test_evaluate_qa_through_the_predict_callable_scores_gold_logits_100():
    # a predict callable that knows the gold span of each window (by its token ids) must score 100 EM
    # (character tokens: every gold answer is a token span)
    examples = subset(load_task("mlqa", "de").items, 40, seed=0)
    tok = char_tokenizer([t for ex in examples for t in (ex.question, ex.context)])
    labelled = featurize_qa(examples, tok, max_length=512, doc_stride=256)  # an answer of 203 chars fits a window
    gold = {tuple(ids): (s, e) for ids, s, e in zip(labelled.input_ids, labelled.start_positions, labelled.end_positions)}
    calls = []

    def predict(batch):
        calls.append(batch["input_ids"].shape[0])
        start = torch.zeros(batch["input_ids"].shape)
        end = torch.zeros(batch["input_ids"].shape)
        for r, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            s, e = gold[tuple(ids[mask.bool()].tolist())]
            start[r, s] = end[r, e] = 5.0
        return start, end

    preds, scores = evaluate_qa(predict, tok, examples, lang="de", metric="mlqa", max_length=512, doc_stride=256,
                                batch_size=7, max_answer_length=250, progress=False)
    assert scores == {"exact_match": 100.0, "f1": 100.0}
    assert set(preds) == {ex.id for ex in examples}
    assert sum(calls) == len(labelled) and max(calls) == 7


def test_evaluate_classification_accuracy_matches_a_hand_count():
    tok = encoder_tokenizer()
    examples = load_task("pawsx", "es").items[:50]
    # predict label 1 exactly when the first sentence is longer than the second (by real tokens)
    preds, scores = evaluate_classification(
        lambda b: torch.stack([torch.zeros(len(b["input_ids"])), (b["attention_mask"].sum(1) > 40).float()], 1),
        tok, examples, lang="es", batch_size=16, progress=False)
    lengths = [len(tok(ex.sentence1, ex.sentence2)["input_ids"]) for ex in examples]
    expected = [int(n > 40) for n in lengths]
    assert [preds[ex.id] for ex in examples] == expected
    assert scores["accuracy"] == pytest.approx(100 * np.mean([p == ex.label for p, ex in zip(expected, examples)]))


@pytest.mark.parametrize("arch", ["xlm-roberta", "llama"])
def test_fresh_head_is_seeded_and_backbone_weights_are_loaded(tmp_path, arch):
    path = save_tiny_folder(tmp_path, *subword_backbone(arch))
    a = build_hf_model(str(path), task="qa", seed=3)
    b = build_hf_model(str(path), task="qa", seed=3)
    c = build_hf_model(str(path), task="qa", seed=4)
    head = "qa_outputs"
    assert torch.equal(getattr(a, head).weight, getattr(b, head).weight)
    assert not torch.equal(getattr(a, head).weight, getattr(c, head).weight)
    saved = (XLMRobertaModel if arch == "xlm-roberta" else LlamaModel).from_pretrained(path)
    name, weight = next((n, w) for n, w in saved.state_dict().items() if "embed" in n and n.endswith("weight"))
    assert torch.equal(a.base_model.state_dict()[name], weight)
    # the predictor runs a padded batch end to end
    tok = encoder_tokenizer() if arch == "xlm-roberta" else decoder_tokenizer()
    feats = featurize_qa(load_task("xquad", "en").items[:3], tok, max_length=128, doc_stride=32, with_labels=False)
    start, end = hf_predictor(a)(feats.batch([0, 1, 2], tok.pad_token_id or tok.eos_token_id))
    assert start.shape == end.shape == (3, max(len(x) for x in feats.input_ids[:3]))


def test_cli_eval_writes_prediction_files_and_scores(tiny_xlmr, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["eval", "--task", "xquad", "--langs", "de,zh", "--model", str(tiny_xlmr), "--max_examples", "12",
               "--output_dir", str(out), "--batch_size", "8"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "xquad" in printed and "XQuAD subset of 12" in printed and "avg" in printed
    scores = json.loads((out / "scores.json").read_text())
    assert [r["lang"] for r in scores["results"]] == ["de", "zh"]
    for r in scores["results"]:
        preds = json.loads((out / f"predictions_{r['lang']}.json").read_text(encoding="utf-8"))
        examples = {ex.id: ex for ex in load_task("xquad", r["lang"])}
        # official prediction-file format: {question id: answer text}, text cut from the context
        assert len(preds) == 12 and all(isinstance(v, str) and v in examples[k].context for k, v in preds.items())
        assert r["n_examples"] == 12 and r["data"] == "XQuAD subset of 12" and r["metric"] == "squad"
        assert 0.0 <= r["exact_match"] <= r["f1"] <= 100.0
    # the same rows are evaluated in every language (a subset by question id)
    de = json.loads((out / "predictions_de.json").read_text())
    zh = json.loads((out / "predictions_zh.json").read_text())
    assert set(de) == set(zh)
    # same seed -> same fresh head -> same predictions
    again = run_eval("xquad", "de", model=str(tiny_xlmr), max_examples=12, output_dir=tmp_path / "again", progress=False)
    assert json.loads((tmp_path / "again" / "predictions_de.json").read_text()) == de
    assert again["results"][0]["f1"] == scores["results"][0]["f1"]


def test_pawsx_eval_accuracy_equals_the_prediction_file(tiny_xlmr, tmp_path):
    doc = run_eval("pawsx", "en,ja", model=str(tiny_xlmr), max_examples=30, output_dir=tmp_path, progress=False)
    for r in doc["results"]:
        preds = json.loads((tmp_path / f"predictions_{r['lang']}.json").read_text())
        gold = {ex.id: ex.label for ex in load_task("pawsx", r["lang"])}
        assert len(preds) == 30 and set(preds.values()) <= {0, 1}
        assert r["accuracy"] == pytest.approx(100 * np.mean([gold[k] == v for k, v in preds.items()]), abs=1e-4)
        assert r["data"] == "PAWS-X dev subset of 30"


def test_eval_of_a_run_uses_only_the_rows_it_held_out(tiny_xlmr, tmp_path):
    # a run that trained on half of PAWS-X dev wrote the other half's row ids; evaluation keeps to them
    run = tmp_path / "run"
    run.mkdir()
    rows = sorted(ex.id for ex in load_task("pawsx", "en").items[::100])
    (run / "test_rows.json").write_text(json.dumps({"tasks": ["pawsx"], "ids": rows}))
    predictor = load_predictor("classification", model=str(tiny_xlmr))
    doc = run_eval("pawsx", "en,de", run_dir=str(run), predictor=predictor, output_dir=tmp_path / "o", progress=False)
    for r in doc["results"]:
        assert sorted(json.loads((tmp_path / "o" / f"predictions_{r['lang']}.json").read_text())) == rows
        assert r["n_examples"] == 20 and r["data"] == "PAWS-X dev rows held out of training (20)"
    # a task the run did not split is evaluated on all its rows
    assert held_out_rows(str(run), "xquad") is None
    (run / "test_rows.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="as written by dsxfer train"):
        held_out_rows(str(run), "pawsx")


def test_eval_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["eval", "--task", "tydiqa"]) == 2
    assert "no gold answers" in capsys.readouterr().err
    assert main(["eval", "--task", "xquad", "--langs", "de,xx"]) == 2
    assert "unknown language code 'xx'" in capsys.readouterr().err
    # a run folder without trained artifacts names what is missing
    assert main(["eval", "--task", "xquad", "--langs", "en", "--run_dir", str(tmp_path / "empty_run"), "--max_examples", "3"]) == 2
    assert "lacks" in capsys.readouterr().err


def test_eval_of_a_trained_run_dir_goes_through_load_trained(tiny_xlmr, tmp_path):
    from dsxfer.config import load_config
    from dsxfer.evaluation.evaluate import transfer_predictor
    from dsxfer.method.model import CONFIG_FILE, build_transfer_model

    cfg = load_config(None, [f"model.name_or_path={tiny_xlmr}", "prompts.length=4", "injection.length=2",
                             "alignment.enabled=false", "model.max_length=128", "model.doc_stride=32", "name=tiny-prompted"])
    model = build_transfer_model(cfg).eval()
    with torch.no_grad():  # a "trained" head that differs from any fresh initialisation
        for p in model.head.parameters():
            p.add_(torch.randn_like(p))
    run = tmp_path / "run"
    model.save_trainable(run)
    (run / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")

    doc = run_eval("xquad", "en", run_dir=str(run), max_examples=5, output_dir=tmp_path / "out", progress=False)
    assert doc["method"] == "tiny-prompted" and doc["run_dir"] == str(run)
    preds = json.loads((tmp_path / "out" / "predictions_en.json").read_text())
    # the same model evaluated directly, with its 4 virtual tokens reserved out of the 128-token budget
    examples = subset(load_task("xquad", "en").items, 5, seed=0)
    direct, _ = evaluate_qa(transfer_predictor(model), model.tokenizer, examples, lang="en", max_length=128,
                            doc_stride=32, reserved_tokens=4, progress=False)
    assert preds == direct


def test_mlqa_cross_language_pair_is_scored_in_the_context_language(tiny_xlmr, tmp_path):
    from dsxfer.evaluation.metrics import qa_scores

    doc = run_eval("mlqa", "zh-en", model=str(tiny_xlmr), max_examples=10, output_dir=tmp_path, progress=False)
    (r,) = doc["results"]
    assert (r["lang"], r["metric"], r["data"]) == ("zh-en", "mlqa", "MLQA dev subset of 10")
    preds = json.loads((tmp_path / "predictions_zh-en.json").read_text(encoding="utf-8"))
    gold = {ex.id: ex.answers for ex in load_task("mlqa", "zh-en") if ex.id in preds}
    # English questions about Chinese contexts: answers are Chinese, so zh mixed segmentation applies
    expected = qa_scores(gold, preds, "mlqa", "zh")
    assert expected["f1"] != qa_scores(gold, preds, "squad")["f1"]  # the choice of normalisation shows
    assert r["f1"] == pytest.approx(expected["f1"], abs=1e-4) and r["exact_match"] == pytest.approx(expected["exact_match"], abs=1e-4)


def test_eval_on_error_skip_reports_the_bad_records(tiny_xlmr, tmp_path, capsys):
    # a copy of XQuAD German with one answer moved away from its text
    data = tmp_path / "data"
    (data / "xquad").mkdir(parents=True)
    doc = json.loads(task_file("xquad", "de").read_text(encoding="utf-8"))
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] += 3
    (data / "xquad" / "xquad.de.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    args = ["eval", "--task", "xquad", "--langs", "de", "--model", str(tiny_xlmr), "--max_examples", "5",
            "--data_dir", str(data), "--output_dir", str(tmp_path / "out")]
    assert main(args) == 2
    assert "xquad.de.json: data[0].paragraphs[0].qas[1] (id " in capsys.readouterr().err
    assert main([*args, "--on_error", "skip"]) == 0
    assert "(1 bad records skipped)" in capsys.readouterr().out
    (r,) = json.loads((tmp_path / "out" / "scores.json").read_text())["results"]
    assert r["skipped"]["count"] == 1 and "is not in the context at answer_start" in next(iter(r["skipped"]["reasons"]))
    assert r["data"] == "XQuAD subset of 5"


@pytest.mark.parametrize("task", ["qa", "classification"])
def test_cpu_predictor_runs_pieces_cut_to_their_longest_row_with_the_whole_batchs_outputs(tiny_xlmr, monkeypatch, task):
    from dsxfer.config import load_config
    from dsxfer.evaluation import evaluate as ev
    from dsxfer.method.model import build_transfer_model

    extra = [] if task == "qa" else ["model.task=classification", "model.num_labels=2"]
    cfg = load_config(None, [f"model.name_or_path={tiny_xlmr}", "prompts.length=3", "injection.length=2",
                             "alignment.enabled=false", *extra])
    model = build_transfer_model(cfg).eval()
    lengths = [40, 40, 33, 21, 20, 9, 5]  # right padded, longest first, as evaluate_qa batches them
    ids = torch.full((len(lengths), 40), 1, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(5, 200, (n,))
        mask[r, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.inference_mode():
        whole = model(dict(batch))
    width = model.backbone.config.intermediate_size
    monkeypatch.setattr(ev, "CPU_PIECE_ELEMENTS", 2 * (40 + 3) * width)  # pieces of 2 rows: 4 forward passes
    assert ev.cpu_piece_rows(model.backbone.config, 43) == 2
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0]["input_ids"].shape))
    out = ev.transfer_predictor(model, task)(batch)
    assert calls == [(2, 40), (2, 33), (2, 20), (1, 5)]  # each piece cut to its own longest row
    if task == "classification":
        torch.testing.assert_close(out, whole["logits"], rtol=1e-5, atol=1e-5)
        return
    for got, ref in zip(out, (whole["start_logits"], whole["end_logits"])):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # padded positions too: the model's fill value
    # a left-padded batch keeps its columns (cutting would drop real tokens)
    calls.clear()
    ev.transfer_predictor(model, task)({"input_ids": ids[2:4].flip(-1), "attention_mask": mask[2:4].flip(-1)})
    assert calls == [(2, 40)]
