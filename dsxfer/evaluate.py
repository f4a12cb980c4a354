"""Per-language evaluation around a predict function.

Everything model-specific sits behind one callable:
- QA: predict(batch) -> (start_logits, end_logits), each (B, T) over the batch's real tokens;
- classification: predict(batch) -> logits (B, num_labels);
where batch holds right-padded input_ids, attention_mask (and token_type_ids when the tokenizer gives
them). `hf_predictor` builds one from an HF AutoModelForQuestionAnswering / ...SequenceClassification
(any backbone, a freshly initialised seeded head); `transfer_predictor` wraps a trained TransferModel
(dsxfer.model.load_trained), whose virtual tokens are reserved out of the length budget.

Outputs (run_eval): predictions_<lang>.json in the official prediction-file format ({question_id:
answer_text}; {row_id: label} for classification) and scores.json with one entry per language
(task, lang, metric values, n examples, the data it evaluates on).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsxfer.data.qa import collate_pairs, featurize_pairs, featurize_qa, pad_token_id, postprocess_qa
from dsxfer.data.readers import PairExample, QAExample
from dsxfer.errors import DataError, DsxferError
from dsxfer.metrics import accuracy, majority_rate, qa_scores

QAPredict = Callable[[dict], tuple[Any, Any]]
ClassifyPredict = Callable[[dict], Any]


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        return t.detach().float().cpu().numpy()
    return np.asarray(t)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="feat", disable=not enabled, leave=False)


def evaluate_qa(
    predict: QAPredict,
    tokenizer: Any,
    examples: Sequence[QAExample],
    *,
    lang: str,
    metric: str = "squad",
    max_length: int = 384,
    doc_stride: int = 128,
    reserved_tokens: int = 0,
    batch_size: int = 32,
    n_best: int = 20,
    max_answer_length: int = 30,
    progress: bool = True,
) -> tuple[dict[str, str], dict[str, float]]:
    """Featurize, predict every window, decode answers, score. Returns (predictions, {exact_match, f1})."""
    unlabelled = [ex.id for ex in examples if not ex.answers]
    if unlabelled:
        raise DataError(f"{len(unlabelled)} question(s) have no gold answer (e.g. {unlabelled[0]}): this split cannot be scored "
                        "(XTREME's TyDi QA dev ships without answers); evaluate on xquad or mlqa")
    feats = featurize_qa(examples, tokenizer, max_length=max_length, doc_stride=doc_stride,
                         reserved_tokens=reserved_tokens, with_labels=False)
    pad = pad_token_id(tokenizer)
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    with _progress(len(feats), f"qa {lang}", progress) as bar:
        for lo in range(0, len(feats), batch_size):
            idx = list(range(lo, min(lo + batch_size, len(feats))))
            sl, el = predict(feats.batch(idx, pad))
            sl, el = _to_numpy(sl), _to_numpy(el)
            for r, i in enumerate(idx):
                n = len(feats.input_ids[i])
                starts.append(sl[r, :n])
                ends.append(el[r, :n])
            bar.update(len(idx))
    predictions = postprocess_qa(examples, feats, starts, ends, n_best=n_best, max_answer_length=max_answer_length)
    scores = qa_scores({ex.id: ex.answers for ex in examples}, predictions, metric, lang if metric == "mlqa" else None)
    return predictions, scores


def evaluate_classification(
    predict: ClassifyPredict,
    tokenizer: Any,
    examples: Sequence[PairExample],
    *,
    lang: str,
    max_length: int = 128,
    reserved_tokens: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[dict[str, int], dict[str, float]]:
    """Predict a label per pair and score accuracy. Returns ({row id: label}, {accuracy})."""
    feats = featurize_pairs(examples, tokenizer, max_length=max_length, reserved_tokens=reserved_tokens)
    pad = pad_token_id(tokenizer)
    labels: list[int] = []
    with _progress(len(examples), f"pairs {lang}", progress) as bar:
        for lo in range(0, len(examples), batch_size):
            idx = list(range(lo, min(lo + batch_size, len(examples))))
            logits = _to_numpy(predict(collate_pairs(feats, idx, pad, with_labels=False)))
            labels += [int(x) for x in logits.argmax(-1)]
            bar.update(len(idx))
    predictions = {ex.id: lab for ex, lab in zip(examples, labels)}
    golds = [ex.label for ex in examples]
    return predictions, {"accuracy": accuracy(labels, golds), "majority_accuracy": majority_rate(golds)}


# -------------------------------------------------------------------------------- predictors


def build_hf_model(name_or_path: str | None = None, *, task: str = "qa", num_labels: int = 2, seed: int = 0):
    """An HF AutoModelForQuestionAnswering / AutoModelForSequenceClassification whose backbone weights
    come from name_or_path (None = the embedded default) and whose head is freshly initialised from
    seed. The head is untrained: scores measure the untrained baseline, not a method."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    from dsxfer.backbone import load_backbone

    base = load_backbone(name_or_path)
    config = base.config
    if task not in ("qa", "classification"):
        raise DsxferError(f"unknown task kind '{task}': qa or classification")
    if task == "classification":
        config.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):  # seed the head without touching the caller's RNG
        torch.manual_seed(seed)
        auto = AutoModelForQuestionAnswering if task == "qa" else AutoModelForSequenceClassification
        model = auto.from_config(config)
    inner = getattr(model, model.base_model_prefix)
    missing, _unexpected = inner.load_state_dict(base.state_dict(), strict=False)
    missing = [k for k in missing if "pooler" not in k]  # QA heads of some encoders drop the pooler
    if missing:
        raise DsxferError(f"backbone weights do not fit the {task} model: {len(missing)} missing (e.g. {missing[0]})")
    return model.eval()


def hf_predictor(model: Any, task: str = "qa") -> Callable[[dict], Any]:
    """predict(batch) for an HF ...ForQuestionAnswering / ...ForSequenceClassification model."""
    import torch

    device = next(model.parameters()).device

    @torch.no_grad()
    def predict(batch: dict):
        out = model(**{k: v.to(device) for k, v in batch.items()})
        return (out.start_logits, out.end_logits) if task == "qa" else out.logits

    return predict


def transfer_predictor(model: Any, task: str = "qa") -> Callable[[dict], Any]:
    """predict(batch) for a TransferModel (forward(batch) -> dict with start/end logits or logits)."""
    import torch

    @torch.no_grad()
    def predict(batch: dict):
        out = model(batch)
        return (out["start_logits"], out["end_logits"]) if task == "qa" else out["logits"]

    return predict


@dataclass
class Predictor:
    predict: Callable[[dict], Any]
    tokenizer: Any
    reserved_tokens: int
    method: str
    model_name: str
    max_length: int | None = None
    doc_stride: int | None = None


def load_predictor(task_kind: str, *, model: str | None = None, run_dir: str | None = None,
                   num_labels: int = 2, seed: int = 0) -> Predictor:
    """A trained run (run_dir, through dsxfer.model.load_trained) or a backbone with a fresh head."""
    if run_dir is not None:
        from dsxfer.model import load_trained

        trained = load_trained(run_dir)
        cfg = trained.cfg
        if cfg.model.task != task_kind:
            raise DsxferError(f"run {run_dir} trained a '{cfg.model.task}' head but this task needs '{task_kind}'")
        return Predictor(transfer_predictor(trained, task_kind), trained.tokenizer, int(trained.num_virtual_tokens),
                         cfg.name, str(cfg.model.name_or_path or "embedded-default"), cfg.model.max_length, cfg.model.doc_stride)
    from dsxfer.backbone import load_tokenizer

    hf = build_hf_model(model, task=task_kind, num_labels=num_labels, seed=seed)
    tokenizer = load_tokenizer(model)
    name = model or "embedded-default"
    return Predictor(hf_predictor(hf, task_kind), tokenizer, 0, f"untrained-head({Path(name).name})", name)


# ------------------------------------------------------------------------------ entry point


def subset(examples: Sequence[Any], max_examples: int | None, seed: int = 0) -> list[Any]:
    """A fixed, seeded subset chosen by row id, so the same rows are kept in every language."""
    if max_examples is None or max_examples >= len(examples):
        return list(examples)
    ids = sorted(ex.id for ex in examples)
    keep = set(random.Random(seed).sample(ids, max_examples))
    return [ex for ex in examples if ex.id in keep]


def data_note(task: str, n_used: int, n_total: int, held_out: bool = False) -> str:
    from dsxfer.data.tasks import get_task

    display = get_task(task).display + (f" rows held out of training ({n_total})" if held_out else "")
    return display if n_used == n_total else f"{display} subset of {n_used}"


def check_eval_leakage(run_dir: str | None, task: str, examples: Sequence[Any]) -> None:
    """A trained run's shots.json (written by training) must not share row ids with the test set."""
    if run_dir is None:
        return
    shots_path = Path(run_dir) / "shots.json"
    if not shots_path.is_file():
        return
    from dsxfer.data.sampling import load_shots
    from dsxfer.data.tasks import check_no_overlap

    shots = load_shots(shots_path)
    if shots["task"] != task:
        return
    trained_ids = [i for ids in shots["ids"].values() for i in ids]
    check_no_overlap(trained_ids, examples, f"{shots_path} vs {task} evaluation")


def held_out_rows(run_dir: str | None, task: str) -> set[str] | None:
    """The row ids a trained run held out of `task` (its test_rows.json), or None when it trained on none of it.

    A task that is both trained on and evaluated (PAWS-X dev) is split by row id at training time; its
    evaluation must then use only the held-out rows, in every language.
    """
    path = Path(run_dir) / "test_rows.json" if run_dir else None
    if path is None or not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not {"tasks", "ids"} <= set(doc):
        raise DataError(f"{path}: expected {{\"tasks\": [...], \"ids\": [...]}} as written by dsxfer train; re-run training or delete the file")
    return set(doc["ids"]) if task in doc["tasks"] else None


def run_eval(
    task: str = "xquad", langs: str | Sequence[str] = "all", *, model: str | None = None, run_dir: str | None = None,
    max_examples: int | None = None, output_dir: str | Path = "runs/eval", batch_size: int = 32, seed: int = 0,
    data_dir: str | None = None, max_length: int | None = None, doc_stride: int | None = None, n_best: int = 20,
    max_answer_length: int = 30, progress: bool = True, predictor: Predictor | None = None, on_error: str = "raise",
) -> dict[str, Any]:
    """Evaluate every language of a task; writes predictions_<lang>.json and scores.json into output_dir.
    With on_error="skip" bad records are left out and scores.json says how many and why."""
    from dsxfer.data.tasks import get_task, load_task, parse_langs

    spec = get_task(task)
    lang_list = parse_langs(task, langs)
    if task == "tydiqa":
        raise DataError("tydiqa: the bundled GoldP dev set carries no gold answers, so it cannot be scored; evaluate on xquad or mlqa")
    # read and check every language before loading a model: a bad file or a leak fails in seconds
    data = {}
    held_out = held_out_rows(run_dir, task)
    for lang in lang_list:
        records = load_task(task, lang, data_dir=data_dir, on_error=on_error)
        pool = records.items if held_out is None else [ex for ex in records.items if ex.id in held_out]
        examples = subset(pool, max_examples, seed)
        check_eval_leakage(run_dir, task, examples)
        data[lang] = (examples, len(pool), records.skip_summary())
    if predictor is None:
        predictor = load_predictor(spec.kind, model=model, run_dir=run_dir, num_labels=len(spec.labels) or 2, seed=seed)
    max_length = max_length or predictor.max_length or (384 if spec.kind == "qa" else 128)
    doc_stride = doc_stride or predictor.doc_stride or min(128, max_length // 4)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    # MLQA "de-en" = German context, English question: answers are German, so the metric uses "de"
    for lang, (examples, n_total, skipped) in data.items():
        if spec.kind == "qa":
            preds, scores = evaluate_qa(
                predictor.predict, predictor.tokenizer, examples, lang=lang.partition("-")[0], metric=spec.metric,
                max_length=max_length, doc_stride=doc_stride, reserved_tokens=predictor.reserved_tokens,
                batch_size=batch_size, n_best=n_best, max_answer_length=max_answer_length, progress=progress)
        else:
            preds, scores = evaluate_classification(
                predictor.predict, predictor.tokenizer, examples, lang=lang, max_length=max_length,
                reserved_tokens=predictor.reserved_tokens, batch_size=batch_size, progress=progress)
        (out_dir / f"predictions_{lang}.json").write_text(json.dumps(preds, ensure_ascii=False, indent=1), encoding="utf-8")
        results.append({"task": task, "lang": lang, "metric": spec.metric, **{k: round(v, 4) for k, v in scores.items()},
                        "n_examples": len(examples), "data": data_note(task, len(examples), n_total, held_out is not None)})
        if skipped:
            results[-1]["skipped"] = {"count": sum(skipped.values()), "reasons": skipped}
    doc = {"method": predictor.method, "model": predictor.model_name, "run_dir": str(run_dir) if run_dir else None,
           "seed": seed, "task": task, "results": results}
    (out_dir / "scores.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    return doc


def format_scores(doc: dict[str, Any]) -> str:
    """A plain-text table of a scores.json document, with the average over languages."""
    rows = doc["results"]
    names = [k for k in ("exact_match", "f1", "accuracy") if rows and k in rows[0]]
    header = f"{'lang':<8}" + "".join(f"{n:>12}" for n in names) + f"{'n':>8}  data"
    lines = [f"{doc['task']}  method={doc['method']}  model={doc['model']}", header]
    for r in rows:
        skipped = f"  ({r['skipped']['count']} bad records skipped)" if "skipped" in r else ""
        lines.append(f"{r['lang']:<8}" + "".join(f"{r[n]:>12.2f}" for n in names) + f"{r['n_examples']:>8}  {r['data']}{skipped}")
    # the one average of every dsxfer table (dsxfer.report): over the target languages, source apart
    from dsxfer.report import DEFAULT_SOURCE_LANG, read_run_config, target_average

    cfg = read_run_config(doc["run_dir"]) if doc.get("run_dir") else None
    source = cfg["data"]["source_lang"] if cfg else DEFAULT_SOURCE_LANG
    targets = [r["lang"] for r in rows if r["lang"] != source]
    if len(targets) > 1:
        means = [target_average({r["lang"]: r[n] for r in rows}, targets) for n in names]
        lines.append(f"avg over the targets {', '.join(targets)} (source {source} not included): "
                     + ", ".join(f"{n} {m:.2f}" for n, m in zip(names, means)))
    return "\n".join(lines)
