"""Per-language evaluation around a predict function.

Everything model-specific sits behind one callable:
- QA: predict(batch) -> (start_logits, end_logits), each (B, T) over the batch's real tokens;
- classification: predict(batch) -> logits (B, num_labels);
where batch holds right-padded input_ids, attention_mask (and token_type_ids when the tokenizer gives
them). `hf_predictor` builds one from an HF AutoModelForQuestionAnswering / ...SequenceClassification
(any backbone, a freshly initialised seeded head); `transfer_predictor` wraps a trained TransferModel
(dsxfer.method.model.load_trained), whose virtual tokens are reserved out of the length budget.

What is evaluated (run_eval): every language of a benchmark task, or the user's own files (SQuAD-format
JSON, PAWS-X TSV with or without header, JSONL), each named by its path. Before any model loads, every
file is read and checked, and for a trained run the rows it trained on (its k shots in shots.json, its
source pool in train_rows.json) are left out of the same task's evaluation and counted.

Outputs (run_eval): predictions_<lang>.json (predictions_<file name>.json for a file) in the official
prediction-file format ({question_id: answer_text}; {row_id: label} for classification) and
scores.json with one entry per language or file (task or file name, lang, metric values, n examples,
the data it evaluates on, what was excluded or skipped). score_predictions scores an existing
prediction file with the same metric code (`dsxfer score`).
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
from dsxfer.errors import ConfigError, DataError, DsxferError
from dsxfer.evaluation.metrics import accuracy, majority_rate, qa_scores

QAPredict = Callable[[dict], tuple[Any, Any]]
ClassifyPredict = Callable[[dict], Any]


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        return t.detach().float().cpu().numpy()
    return np.asarray(t)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="feat", disable=not enabled, leave=False)


def _batch_order(lengths: Sequence[int], length_sorted: bool) -> list[int]:
    """Feature indices in the order they are batched: longest first (ties in input order), or as given."""
    if not length_sorted:
        return list(range(len(lengths)))
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


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
    length_sorted: bool = True,
) -> tuple[dict[str, str], dict[str, float]]:
    """Featurize, predict every window, decode answers, score. Returns (predictions, {exact_match, f1}).

    Windows are batched longest first (length_sorted), so a batch pads little; the logits are put back in
    the featurized order before decoding, so the predictions do not depend on the batching."""
    unlabelled = [ex.id for ex in examples if not ex.answers]
    if unlabelled:
        raise DataError(f"{len(unlabelled)} question(s) have no gold answer (e.g. {unlabelled[0]}): this split cannot be scored "
                        "(XTREME's TyDi QA dev ships without answers); evaluate on xquad or mlqa")
    feats = featurize_qa(examples, tokenizer, max_length=max_length, doc_stride=doc_stride,
                         reserved_tokens=reserved_tokens, with_labels=False)
    pad = pad_token_id(tokenizer)
    starts: list[np.ndarray] = [None] * len(feats)  # type: ignore[list-item]
    ends: list[np.ndarray] = [None] * len(feats)  # type: ignore[list-item]
    order = _batch_order([len(r) for r in feats.input_ids], length_sorted)
    with _progress(len(feats), f"qa {lang}", progress) as bar:
        for lo in range(0, len(feats), batch_size):
            idx = order[lo: lo + batch_size]
            sl, el = predict(feats.batch(idx, pad))
            sl, el = _to_numpy(sl), _to_numpy(el)
            for r, i in enumerate(idx):
                n = len(feats.input_ids[i])
                starts[i] = sl[r, :n]
                ends[i] = el[r, :n]
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
    length_sorted: bool = True,
) -> tuple[dict[str, int], dict[str, float]]:
    """Predict a label per pair and score accuracy. Returns ({row id: label}, {accuracy}).
    Pairs are batched longest first (length_sorted); labels are kept in the examples' order."""
    feats = featurize_pairs(examples, tokenizer, max_length=max_length, reserved_tokens=reserved_tokens)
    pad = pad_token_id(tokenizer)
    labels: list[int] = [0] * len(examples)
    order = _batch_order([len(r) for r in feats["input_ids"]], length_sorted)
    with _progress(len(examples), f"pairs {lang}", progress) as bar:
        for lo in range(0, len(examples), batch_size):
            idx = order[lo: lo + batch_size]
            logits = _to_numpy(predict(collate_pairs(feats, idx, pad, with_labels=False)))
            for i, x in zip(idx, logits.argmax(-1)):
                labels[i] = int(x)
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

    from dsxfer.method.backbone import load_backbone

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


# On a CPU a forward pass costs what its padded tokens cost, and a smaller one is no slower per token. A
# batch of evaluation windows sorted longest first still pads its short tail rows to the batch's longest;
# run in pieces, each cut to its own longest row, it pads far less: 0.86x the time of the whole batch at 32
# windows of at most 192 tokens through the embedded model (docs/PERF.md, 2026-12-02 09:00). A piece's
# widest activation (tokens x intermediate size) holds at most this many elements (8 MiB in float32; 1, 2, 3,
# 4, 6 and 16 Mi elements measured: 2 Mi was fastest, 16 Mi, i.e. the whole batch, 1.15x slower).
CPU_PIECE_ELEMENTS = 2**21


def cpu_piece_rows(config: Any, seq_len: int) -> int:
    """Rows per forward piece on a CPU for windows of seq_len tokens (at least 1)."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    width = int(getattr(config, "intermediate_size", 0) or 0) or 4 * hidden or 1
    return max(1, CPU_PIECE_ELEMENTS // (max(1, seq_len) * width))


def _cut_padding(piece: dict) -> tuple[dict, int]:
    """A right-padded piece without the columns that are padding in every row; (piece, its old length)."""
    mask = piece.get("attention_mask")
    length = piece["input_ids"].shape[-1]
    if mask is None:
        return piece, length
    keep = int(mask.sum(-1).max())
    if keep == length or bool(mask[:, keep:].any()):  # nothing to cut, or left padding: leave it as it is
        return piece, length
    return {k: v[:, :keep] if hasattr(v, "dim") and v.dim() == 2 and v.shape[-1] == length else v
            for k, v in piece.items()}, length


def transfer_predictor(model: Any, task: str = "qa") -> Callable[[dict], Any]:
    """predict(batch) for a TransferModel (forward(batch) -> dict with start/end logits or logits); the batch
    goes to the device the model's parameters are on (a DeepSpeed engine's module on GPU, or the CPU).
    Evaluation never builds autograd state: inference mode, or no_grad for ZeRO-3 partitioned parameters
    (DeepSpeed gathers them into tensors that must stay usable by the next training step). On a CPU the
    batch runs in pieces of `cpu_piece_rows` rows, each cut to its longest row; the outputs are those of the
    whole batch (a padded position a piece did not compute gets the value the model gives padding)."""
    import torch

    from dsxfer.method.model import _MASKED

    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    no_autograd = torch.no_grad if any(hasattr(p, "ds_id") for p in params) else torch.inference_mode
    backbone_config = getattr(getattr(model, "backbone", None), "config", None)

    def forward(batch: dict):
        out = model({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return (out["start_logits"], out["end_logits"]) if task == "qa" else out["logits"]

    def widen(logits: torch.Tensor, length: int) -> torch.Tensor:
        if logits.shape[-1] == length:
            return logits
        return torch.nn.functional.pad(logits, (0, length - logits.shape[-1]), value=_MASKED)

    @no_autograd()
    def predict(batch: dict):
        ids = batch["input_ids"]
        if device.type != "cpu":
            return forward(batch)
        rows = cpu_piece_rows(backbone_config, ids.shape[-1] + int(getattr(model, "num_virtual_tokens", 0)))
        pieces = []
        for i in range(0, len(ids), rows):
            piece, length = _cut_padding({k: v[i:i + rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            out = forward(piece)
            pieces.append((widen(out[0], length), widen(out[1], length)) if task == "qa" else out)
        if len(pieces) == 1:
            return pieces[0]
        if task == "qa":
            return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])
        return torch.cat(pieces)

    return predict


SOURCE_DEV_DIR = "source_dev"  # in a run folder: predictions + scores.json of the best source dev evaluation


def source_dev_evaluator(cfg, tokenizer: Any, examples: Sequence[Any], *,
                         reserved_tokens: int) -> Callable[[Any], tuple[dict[str, Any], dict[str, float]]]:
    """evaluate(model) -> (predictions, scores) of the held-out source-language dev set: {id: answer text} and
    {exact_match, f1} for QA, {id: label} and {accuracy, majority_accuracy} for classification. The scores
    are what training's early stopping watches."""
    task, m = cfg.model.task, cfg.model

    def evaluate(model) -> tuple[dict[str, Any], dict[str, float]]:
        predict = transfer_predictor(model, task)
        if task == "qa":
            return evaluate_qa(predict, tokenizer, examples, lang=cfg.data.source_lang, max_length=m.max_length,
                               doc_stride=m.doc_stride, reserved_tokens=reserved_tokens,
                               batch_size=cfg.eval.batch_size, progress=False)
        return evaluate_classification(predict, tokenizer, examples, lang=cfg.data.source_lang, max_length=m.max_length,
                                       reserved_tokens=reserved_tokens, batch_size=cfg.eval.batch_size, progress=False)

    return evaluate


def write_source_dev(out_dir: str | Path, cfg, examples: Sequence[Any], predictions: dict[str, Any], scores: dict[str, float], *,
                     method: str, run_dir: str, step: int | None = None) -> dict[str, Any]:
    """The source dev hold-out's prediction file and scores.json in out_dir, as `dsxfer eval` writes a set's
    (training writes them into <run>/source_dev/ at every dev evaluation that improves on the best, with its
    step); returns the set's scores.json result."""
    lang, qa = cfg.data.source_lang, cfg.model.task == "qa"
    s = EvalSet("source_dev", lang, "squad" if qa else "accuracy", None, list(examples),
                f"{cfg.data.train_task} {lang} train: the source dev hold-out ({len(examples)} {'questions' if qa else 'rows'}, never trained on)",
                f"predictions_{lang}.json", {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / s.predictions).write_text(json.dumps(predictions, ensure_ascii=False, indent=1), encoding="utf-8")
    result = _result(s, scores)
    doc = {"method": method, "run_dir": run_dir, "task": "source_dev", **({"step": step} if step is not None else {}), "results": [result]}
    (out_dir / "scores.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    return result


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
    """A trained run (run_dir, through dsxfer.method.model.load_trained) or a backbone with a fresh head."""
    if run_dir is not None:
        from dsxfer.method.model import load_trained

        trained = load_trained(run_dir)
        trained.merge_lora()  # inference only: one matrix product per adapted projection
        cfg = trained.cfg
        if cfg.model.task != task_kind:
            raise DsxferError(f"run {run_dir} trained a '{cfg.model.task}' head but this task needs '{task_kind}'")
        return Predictor(transfer_predictor(trained, task_kind), trained.tokenizer, int(trained.num_virtual_tokens),
                         cfg.name, str(cfg.model.name_or_path or "embedded-default"), cfg.model.max_length, cfg.model.doc_stride)
    from dsxfer.method.backbone import load_tokenizer

    hf = build_hf_model(model, task=task_kind, num_labels=num_labels, seed=seed)
    tokenizer = load_tokenizer(model)
    name = model or "embedded-default"
    return Predictor(hf_predictor(hf, task_kind), tokenizer, 0, f"untrained-head({Path(name).name})", name)


# ------------------------------------------------------------------------------ what is evaluated


def subset(examples: Sequence[Any], max_examples: int | None, seed: int = 0) -> list[Any]:
    """A fixed, seeded subset chosen by row id, so the same rows are kept in every language."""
    if max_examples is None or max_examples >= len(examples):
        return list(examples)
    ids = sorted(ex.id for ex in examples)
    keep = set(random.Random(seed).sample(ids, max_examples))
    return [ex for ex in examples if ex.id in keep]


def data_note(display: str, n_used: int, n_pool: int, *, held_out: int | None = None, excluded: int = 0) -> str:
    """How the table names the data: 'XQuAD', 'MLQA dev subset of 100 (5 rows the run trained on excluded)', ..."""
    note = display + (f" rows held out of training ({held_out})" if held_out is not None else "")
    if n_used != n_pool:
        note += f" subset of {n_used}"
    if excluded:
        note += f" ({excluded} row{'s' if excluded != 1 else ''} the run trained on excluded)"
    return note


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


TRAIN_ROWS_FILE = "train_rows.json"  # written by dsxfer train: {"task": source task or null, "ids": [...]}


@dataclass(frozen=True)
class TrainedRows:
    """Row ids a run trained on, from one of the files training writes into its folder."""

    task: str | None  # the benchmark the ids belong to (None: the user's own training files)
    what: str  # how tables and scores.json name them
    ids: frozenset[str]


def trained_rows(run_dir: str | None) -> list[TrainedRows]:
    """The rows a run recorded as trained on: its k shots (shots.json) and its source pool (train_rows.json)."""
    if run_dir is None:
        return []
    from dsxfer.data.sampling import load_shots

    run = Path(run_dir)
    out = []
    if (run / "shots.json").is_file():
        shots = load_shots(run / "shots.json")
        ids = frozenset(i for lang_ids in shots["ids"].values() for i in lang_ids)
        if ids:
            out.append(TrainedRows(shots["task"], f"{shots['k']}-shot {shots['task']} rows (shots.json)", ids))
    path = run / TRAIN_ROWS_FILE
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); re-run training or delete the file") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("ids"), list) or "task" not in doc:
            raise DataError(f"{path}: expected {{\"task\": ..., \"ids\": [...]}} as written by dsxfer train; re-run training or delete the file")
        out.append(TrainedRows(doc["task"], f"{doc['task'] or 'own files'} source training rows ({TRAIN_ROWS_FILE})", frozenset(doc["ids"])))
    return out


def exclude_trained(examples: Sequence[Any], task: str | None, rows: Sequence[TrainedRows]) -> tuple[list[Any], dict[str, int]]:
    """The examples without the rows the run trained on from the same task, and how many each record removed.

    Rows are translations of each other across languages (XQuAD, MLQA, PAWS-X), so an id trained on in
    any language is excluded in every language.
    """
    ids = {ex.id for ex in examples}
    banned: set[str] = set()
    counts: dict[str, int] = {}
    for r in rows:
        if task is None or r.task != task:
            continue
        hit = ids & r.ids
        counts[r.what] = len(hit)
        banned |= hit
    return [ex for ex in examples if ex.id not in banned], counts


@dataclass
class EvalSet:
    """One evaluation set (a task's language or one of the user's files), read and filtered before any model loads."""

    name: str  # scores.json "task": the benchmark, or the file's name
    lang: str  # the table's row label
    metric: str
    metric_lang: str | None  # the language MLQA's normalisation uses (context language of 'de-en')
    examples: list[Any]
    data: str  # how the table names the data
    predictions: str  # file name of the predictions
    skipped: dict[str, int]
    excluded: dict[str, Any] | None = None  # None: not evaluated for a run
    file: str | None = None
    warning: str | None = None


def _filtered(pool: Sequence[Any], display: str, *, task: str | None, held_out: set[str] | None,
              rows: Sequence[TrainedRows], max_examples: int | None, seed: int, run_dir: str | None) -> tuple[list, str, dict | None]:
    """Held-out rows only (a task the run split), without rows the run trained on, then the seeded subset."""
    if held_out is not None:
        pool = [ex for ex in pool if ex.id in held_out]
    n_held = len(pool) if held_out is not None else None
    kept, counts = exclude_trained(pool, task, rows)
    n_excluded = len(pool) - len(kept)
    if pool and not kept:
        raise DataError(f"{display}: all {len(pool)} rows are rows the run {run_dir} trained on ({', '.join(counts)}); "
                        "nothing is left to evaluate: evaluate another language, task or file")
    examples = subset(kept, max_examples, seed)
    excluded = {"count": n_excluded, "by_source": counts} if run_dir is not None else None
    return examples, data_note(display, len(examples), len(kept), held_out=n_held, excluded=n_excluded), excluded


def parse_file_entry(entry: str, where: str = "eval.files") -> tuple[str, str]:
    """'PATH:LANG' -> (PATH, LANG). The last ':' splits, so the path itself may hold colons."""
    path, sep, lang = str(entry).rpartition(":")
    lang = lang.strip()
    if not sep or not path.strip() or not lang or not all(ch.isalnum() or ch in "-_" for ch in lang):
        raise ConfigError(f"{where} entry {entry!r} is not 'PATH:LANG' (e.g. data/my_test.json:de): give every file its language code")
    return path.strip(), lang


def _jsonl_kind(path: Path) -> str:
    """qa or classification, from the keys of a JSONL file's first record."""
    from dsxfer.data.readers import read_text, split_lines

    for lineno, line in enumerate(split_lines(read_text(path)), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg}); write one JSON object per line") from None
        if isinstance(rec, dict) and "context" in rec:
            return "qa"
        if isinstance(rec, dict) and "sentence1" in rec:
            return "classification"
        raise DataError(f"{path}: line {lineno}: a record needs 'context' (QA: id, context, question, answers) or "
                        "'sentence1' (pairs: id, sentence1, sentence2, label); or pass --task to say which it is")
    raise DataError(f"{path}: holds no records; point to a file with records")


def read_eval_file(path: str | Path, lang: str, *, kind: str | None = None, labels: tuple[int, ...] = (0, 1),
                   on_error: str = "raise") -> tuple[Any, str, str]:
    """Read one of the user's files by its extension -> (records, kind, format): SQuAD-format .json (QA),
    PAWS-X .tsv with or without header (pairs), or .jsonl (either, told by its fields or by kind)."""
    from dsxfer.data.readers import check_unique_ids, read_jsonl, read_pawsx_tsv, read_squad_json

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".json":
        file_kind, fmt = "qa", "SQuAD JSON"
    elif suffix == ".tsv":
        file_kind, fmt = "classification", "PAWS-X TSV"
    elif suffix == ".jsonl":
        if not p.is_file():
            raise DataError(f"{p}: file not found; check the path")
        file_kind, fmt = kind or _jsonl_kind(p), "JSONL"
    else:
        raise DataError(f"{p}: cannot tell the format from the extension '{p.suffix}': give a SQuAD-format .json, "
                        "a PAWS-X .tsv or a .jsonl file")
    if kind is not None and file_kind != kind:
        raise DataError(f"{p}: a {fmt} file holds {'QA' if file_kind == 'qa' else 'sentence-pair'} records, but the task or "
                        f"model here is {kind}; give a {'.json or .jsonl' if kind == 'qa' else '.tsv or .jsonl'} file")
    if suffix == ".json":
        recs = read_squad_json(p, lang, on_error=on_error)
    elif suffix == ".tsv":
        recs = read_pawsx_tsv(p, lang, on_error=on_error, labels=labels)
    else:
        recs = read_jsonl(p, file_kind, lang, on_error=on_error, labels=labels if file_kind == "classification" else None)
    check_unique_ids(recs, str(p))
    return recs, file_kind, fmt


def _check_metric_lang(metric: str, lang: str, what: str) -> str | None:
    """The language MLQA's normalisation uses for lang (the context language of 'de-en'), checked early."""
    if metric != "mlqa":
        return None
    from dsxfer.evaluation.metrics import MLQA_LANGS

    context_lang = lang.partition("-")[0]
    if context_lang not in MLQA_LANGS:
        raise DataError(f"{what}: the MLQA metric is defined for {', '.join(MLQA_LANGS)}, not '{lang}'; "
                        "give one of them as the language, or leave out --task mlqa to score with SQuAD v1.1")
    return context_lang


def _predictions_name(stem: str, taken: set[str]) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem) or "file"
    name, n = f"predictions_{safe}.json", 2
    while name in taken:
        name, n = f"predictions_{safe}-{n}.json", n + 1
    taken.add(name)
    return name


def _benchmark_sets(task: str, langs: str | Sequence[str], *, data_dir: str | None, on_error: str, run_dir: str | None,
                    max_examples: int | None, seed: int) -> list[EvalSet]:
    from dsxfer.data.tasks import get_task, load_task, parse_langs

    spec = get_task(task)
    if task == "tydiqa":
        raise DataError("tydiqa: the bundled GoldP dev set carries no gold answers, so it cannot be scored; evaluate on xquad or mlqa")
    lang_list = parse_langs(task, langs)
    held_out, rows = held_out_rows(run_dir, task), trained_rows(run_dir)
    sets = []
    for lang in lang_list:
        records = load_task(task, lang, data_dir=data_dir, on_error=on_error)
        examples, note, excluded = _filtered(records.items, spec.display, task=task, held_out=held_out, rows=rows,
                                             max_examples=max_examples, seed=seed, run_dir=run_dir)
        # MLQA "de-en" = German context, English question: answers are German, so the metric uses "de"
        sets.append(EvalSet(task, lang, spec.metric, lang.partition("-")[0] if spec.metric == "mlqa" else None, examples, note,
                            f"predictions_{lang}.json", records.skip_summary(), excluded))
    return sets


def _file_sets(files: Sequence[tuple[str, str]], task: str | None, kind: str | None, labels: tuple[int, ...], *,
               on_error: str, run_dir: str | None, max_examples: int | None, seed: int) -> tuple[list[EvalSet], str]:
    """One set per (path, lang); with a task the files count as that benchmark's rows (its metric, held-out rows and
    exclusion of the rows the run trained on); without one they are the user's own data."""
    from dsxfer.data.tasks import get_task

    spec = get_task(task) if task else None
    if spec is not None:
        kind, labels = spec.kind, spec.labels or labels
    held_out, rows = (held_out_rows(run_dir, task) if task else None), trained_rows(run_dir)
    sets, kinds, taken = [], set(), set()
    for path, lang in files:
        recs, file_kind, _fmt = read_eval_file(path, lang, kind=kind, labels=labels, on_error=on_error)
        kinds.add(file_kind)
        if len(kinds) > 1:
            raise DataError(f"{path}: holds {file_kind} records but an earlier file holds {kinds - {file_kind}}; "
                            "evaluate QA files and sentence-pair files in separate runs")
        metric = spec.metric if spec else ("squad" if file_kind == "qa" else "accuracy")
        examples, note, excluded = _filtered(recs.items, str(path), task=task, held_out=held_out, rows=rows,
                                             max_examples=max_examples, seed=seed, run_dir=run_dir)
        warning = None
        if task is None and rows:  # the user's own data: ids equal to trained ids are named, never dropped
            coincide = {r.task: len({ex.id for ex in examples} & r.ids) for r in rows}
            coincide = {t: n for t, n in coincide.items() if n}
            if coincide:
                t, n = next(iter(coincide.items()))
                warning = (f"{n} row id(s) of {path} equal ids the run {run_dir} trained on ({t}); if this file holds {t} rows, "
                           f"pass --task {t} to leave them out")
        sets.append(EvalSet(Path(path).name, lang, metric, _check_metric_lang(metric, lang, str(path)), examples, note,
                            _predictions_name(Path(path).stem, taken), recs.skip_summary(), excluded, str(path), warning))
    return sets, kinds.pop()


def _run_kind(run_dir: str) -> tuple[str, int]:
    """(model.task, model.num_labels) of a trained run, read from its config before any model is built."""
    from dsxfer.config import load_config
    from dsxfer.method.model import CONFIG_FILE
    from dsxfer.method.trainable import TRAINABLE_FILE

    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file() or not (run / TRAINABLE_FILE).is_file():
        raise DataError(f"run folder {run} lacks {CONFIG_FILE} or {TRAINABLE_FILE}: give the output_dir of a finished training run")
    cfg = load_config(run / CONFIG_FILE)
    return cfg.model.task, cfg.model.num_labels


# ------------------------------------------------------------------------------ entry points


def run_eval(
    task: str | None = "xquad", langs: str | Sequence[str] = "all", *, files: Sequence[tuple[str, str]] | None = None,
    model: str | None = None, run_dir: str | None = None, max_examples: int | None = None, output_dir: str | Path = "runs/eval",
    batch_size: int = 32, seed: int = 0, data_dir: str | None = None, max_length: int | None = None, doc_stride: int | None = None,
    n_best: int = 20, max_answer_length: int = 30, progress: bool = True, predictor: Predictor | None = None, on_error: str = "raise",
) -> dict[str, Any]:
    """Evaluate every language of a task, or every (path, lang) of files; writes predictions and scores.json into output_dir.

    With a run_dir, rows the run trained on from the same task (shots.json, train_rows.json) are left out
    and counted per result ("excluded"); a task the run split is evaluated on its held-out rows only.
    With on_error="skip" bad records are left out and scores.json says how many and why.
    """
    from dsxfer.data.tasks import get_task

    # read and check every file and the run's records before loading a model: a bad file fails in seconds
    run_kind, num_labels = _run_kind(run_dir) if (run_dir is not None and predictor is None) else (None, 2)
    if files:
        sets, kind = _file_sets(files, task, run_kind, tuple(range(num_labels)), on_error=on_error, run_dir=run_dir,
                                max_examples=max_examples, seed=seed)
    else:
        if task is None:
            raise DataError("nothing to evaluate: give a task (xquad, mlqa, pawsx) or files")
        kind = get_task(task).kind
        if run_kind is not None and run_kind != kind:
            raise DsxferError(f"run {run_dir} trained a '{run_kind}' head but {task} needs '{kind}'")
        sets = _benchmark_sets(task, langs, data_dir=data_dir, on_error=on_error, run_dir=run_dir,
                               max_examples=max_examples, seed=seed)
    if run_kind is not None and run_kind != kind:
        raise DsxferError(f"run {run_dir} trained a '{run_kind}' head but the files hold {kind} records")
    if predictor is None:
        labels = get_task(task).labels if task else ()
        predictor = load_predictor(kind, model=model, run_dir=run_dir, num_labels=len(labels) or num_labels, seed=seed)
    max_length = max_length or predictor.max_length or (384 if kind == "qa" else 128)
    doc_stride = doc_stride or predictor.doc_stride or min(128, max_length // 4)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for s in sets:
        if kind == "qa":
            preds, scores = evaluate_qa(
                predictor.predict, predictor.tokenizer, s.examples, lang=s.metric_lang or s.lang, metric=s.metric,
                max_length=max_length, doc_stride=doc_stride, reserved_tokens=predictor.reserved_tokens,
                batch_size=batch_size, n_best=n_best, max_answer_length=max_answer_length, progress=progress)
        else:
            preds, scores = evaluate_classification(
                predictor.predict, predictor.tokenizer, s.examples, lang=s.lang, max_length=max_length,
                reserved_tokens=predictor.reserved_tokens, batch_size=batch_size, progress=progress)
        (out_dir / s.predictions).write_text(json.dumps(preds, ensure_ascii=False, indent=1), encoding="utf-8")
        results.append(_result(s, scores))
    doc = {"method": predictor.method, "model": predictor.model_name, "run_dir": str(run_dir) if run_dir else None,
           "seed": seed, "task": task or kind, "results": results}
    if files:
        doc["files"] = [f"{path}:{lang}" for path, lang in files]
    (out_dir / "scores.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    return doc


def _result(s: EvalSet, scores: dict[str, float]) -> dict[str, Any]:
    """One scores.json result: the set, its metric values (4 decimals) and what was left out of it and why."""
    r = {"task": s.name, "lang": s.lang, "metric": s.metric, **{k: round(v, 4) for k, v in scores.items()},
         "n_examples": len(s.examples), "data": s.data, "predictions": s.predictions}
    if s.file is not None:
        r["file"] = s.file
    if s.excluded is not None:
        r["excluded"] = s.excluded
    if s.skipped:
        r["skipped"] = {"count": sum(s.skipped.values()), "reasons": s.skipped}
    if s.warning:
        r["warning"] = s.warning
    return r


def _read_predictions(path: Path, kind: str) -> dict[str, Any]:
    """A prediction file in the official format: {question_id: answer_text} (QA) or {id: label} (pairs)."""
    from dsxfer.data.readers import read_text

    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); a prediction file is one JSON object") from None
    expected = "{question_id: answer_text}" if kind == "qa" else "{id: label}"
    if not isinstance(doc, dict):
        raise DataError(f"{path}: top level is a {type(doc).__name__}, not an object: a prediction file is {expected}")
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if kind == "qa" and not isinstance(value, str):
            raise DataError(f"{path}: the prediction for id '{key}' is {value!r}, not an answer text: a QA prediction file is {expected}")
        if kind == "classification":
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"{path}: the prediction for id '{key}' is {value!r}, not an integer label: a prediction file is {expected}")
        out[str(key)] = value
    return out


def score_predictions(
    predictions: str | Path, *, task: str | None = None, lang: str, file: str | Path | None = None,
    data_dir: str | None = None, on_error: str = "raise", output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score an existing prediction file against a benchmark language (task + lang) or a gold file (file + lang),
    with the metric code run_eval uses. A gold id without a prediction scores 0 (the official scripts'
    rule); missing and extra ids are counted in the result. Optionally writes scores.json (for dsxfer report)."""
    from dsxfer.data.tasks import get_task, load_task

    spec = get_task(task) if task else None
    if file is not None:
        recs, kind, _fmt = read_eval_file(file, lang, kind=spec.kind if spec else None, labels=(spec.labels if spec else ()) or (0, 1),
                                          on_error=on_error)
        name, data = Path(file).name, str(file)
        metric = spec.metric if spec else ("squad" if kind == "qa" else "accuracy")
    elif spec is not None:
        if task == "tydiqa":
            raise DataError("tydiqa: the bundled GoldP dev set carries no gold answers, so it cannot be scored; score xquad or mlqa predictions")
        recs, kind, name, data, metric = load_task(task, lang, data_dir=data_dir, on_error=on_error), spec.kind, task, spec.display, spec.metric
    else:
        raise DataError("name the gold data: a task (xquad, mlqa, pawsx) with its language, or a gold file")
    metric_lang = _check_metric_lang(metric, lang, data)
    gold = list(recs.items)
    preds = _read_predictions(Path(predictions), kind)
    gold_ids = {ex.id for ex in gold}
    missing = [ex.id for ex in gold if ex.id not in preds]
    extra = [k for k in preds if k not in gold_ids]
    if len(missing) == len(gold):
        raise DataError(f"{predictions}: none of its {len(preds)} ids is a question of {data} ({lang}), e.g. "
                        f"{', '.join(extra[:3]) or 'none'}; is this the prediction file of this task and language?")
    if kind == "qa":
        scores = qa_scores({ex.id: ex.answers for ex in gold}, preds, metric, metric_lang)
    else:  # a row without a prediction counts as wrong, like a missing QA prediction
        scores = {"accuracy": accuracy([preds.get(ex.id) for ex in gold], [ex.label for ex in gold])}
    result = {"task": name, "lang": lang, "metric": metric, **{k: round(v, 4) for k, v in scores.items()}, "n_examples": len(gold),
              "data": data, "predictions": str(predictions),
              "missing": {"count": len(missing), "examples": missing[:5]}, "extra": {"count": len(extra), "examples": extra[:5]}}
    if recs.skipped:
        result["skipped"] = {"count": len(recs.skipped), "reasons": recs.skip_summary()}
    doc = {"method": f"predictions({Path(predictions).name})", "model": None, "run_dir": None, "seed": None,
           "task": task or kind, "results": [result]}
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    return doc


def format_scores(doc: dict[str, Any]) -> str:
    """A plain-text table of a scores.json document, with the average over its rows."""
    rows = doc["results"]
    names = [k for k in ("exact_match", "f1", "accuracy") if rows and k in rows[0]]
    header = f"{'lang':<8}" + "".join(f"{n:>12}" for n in names) + f"{'n':>8}  data"
    title = f"{doc['task']}  method={doc['method']}" + (f"  model={doc['model']}" if doc.get("model") else "")
    lines = [title, header]
    notes = []
    for r in rows:
        skipped = f"  ({r['skipped']['count']} bad records skipped)" if "skipped" in r else ""
        lines.append(f"{r['lang']:<8}" + "".join(f"{r[n]:>12.2f}" for n in names) + f"{r['n_examples']:>8}  {r['data']}{skipped}")
        if r.get("excluded", {}).get("by_source"):
            notes.append(f"{r['lang']}: excluded " + "; ".join(f"{n} of the {what}" for what, n in r["excluded"]["by_source"].items()))
        if r.get("warning"):
            notes.append(f"warning: {r['warning']}")
    # the one average of every dsxfer table (dsxfer.evaluation.report): over the target languages, source apart
    from dsxfer.evaluation.report import DEFAULT_SOURCE_LANG, read_run_config, target_average

    cfg = read_run_config(doc["run_dir"]) if doc.get("run_dir") else None
    source = cfg["data"]["source_lang"] if cfg else DEFAULT_SOURCE_LANG
    targets = [r["lang"] for r in rows if r["lang"] != source]
    if len(targets) > 1:
        means = [target_average({r["lang"]: r[n] for r in rows}, targets) for n in names]
        lines.append(f"avg over the targets {', '.join(targets)} (source {source} not included): "
                     + ", ".join(f"{n} {m:.2f}" for n, m in zip(names, means)))
    return "\n".join(lines + notes)
