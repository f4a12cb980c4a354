"""From a config to TrainData: readers -> source dev hold-out -> row split -> k shots -> parallel pairs ->
pseudo data -> overlap check -> featurization -> batches.

`build_train_data(cfg, model, tokenizer)` is the whole of it. It takes the model only for what data
assembly must know of it (how many positions the soft prompt reserves, the backbone for lexicon
induction) and imports nothing of dsxfer.method or dsxfer.training. Every count it derives is a line of
`TrainData.notes` saying why; training writes them at the top of train.log.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dsxfer.data.qa import collate_pairs, featurize_pairs, featurize_qa, pad_token_id, right_pad
from dsxfer.data.readers import format_skip_report, skip_report
from dsxfer.errors import ConfigError, DsxferError


@dataclass
class Batches:
    """`n` items, and `make(indices)` -> a dict of tensors holding those items."""

    n: int
    make: Callable[[list[int]], dict[str, torch.Tensor]]
    lengths: list[int] | None = None  # real tokens per item: lets train.batching=length_grouped group them


@dataclass
class TrainData:
    task: Batches | None                      # task features (source language + k target shots)
    align: Batches | None = None              # parallel pairs -> align_src_* / align_tgt_* / align_pair_ids
    align_probes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # lang -> fixed pair batch
    dev_eval: Callable[[torch.nn.Module], tuple[dict, dict[str, float]]] | None = None  # source dev: (predictions, scores with "f1" or "accuracy")
    notes: list[str] = field(default_factory=list)         # what data assembly derived or dropped, for train.log
    skipped: list[dict[str, Any]] = field(default_factory=list)  # bad records left out: reason, count, example
    dev_examples: list = field(default_factory=list)       # the held-out source dev set (dev_eval scores it)

    def skipped_line(self) -> str | None:
        """The train.log line for the bad records data assembly left out (data.on_error=skip), if any."""
        if not self.skipped:
            return None
        return (f"skipped {sum(g['count'] for g in self.skipped)} bad record(s) (data.on_error=skip): "
                f"{format_skip_report(self.skipped)}")


def write_data_record(cfg, out_dir: Path, used: dict[str, Any]) -> None:
    """The rows a run drew and held out, next to its weights: `dsxfer eval --run_dir` never scores them.

    shots.json (the k shots), source_dev_ids.json, test_rows.json (rows of a task split at training time:
    the evaluation uses these only) and train_rows.json (the source rows trained on: left out of the same
    task's evaluation). Raises OSError as the disk does.
    """
    from dsxfer.data.sampling import save_shots

    save_shots(out_dir / "shots.json", used["shots"], task=cfg.data.shot_task, k=cfg.data.k_shot, seed=cfg.train.seed)
    (out_dir / "source_dev_ids.json").write_text(json.dumps(used["source_dev_ids"]))
    if used["test_rows"]:
        (out_dir / "test_rows.json").write_text(json.dumps(used["test_rows"]))
    (out_dir / "train_rows.json").write_text(json.dumps(used["train_rows"]))


def stable_pair_id(text_id: str) -> int:
    """A 63-bit integer for a pair id string: the teacher-cache key, the same in every run and process."""
    return int.from_bytes(hashlib.blake2b(text_id.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def _kept(records, skipped: list) -> list:
    """The good records of a reader's result; what it skipped goes to `skipped` (for train.log / the summary)."""
    skipped.extend(records.skipped)
    return list(records)


# pairs per language whose cosine the training log reports (align/cosine/<lang>); a fixed batch
PROBE_PAIRS = 16


def _parallel_pairs(cfg, skipped: list, notes: list) -> dict[str, list]:
    """Parallel pairs per target language: the user's src/tgt files, else Tatoeba (alignment.* fields).

    With the alignment loss on (or a lexicon to induce) up to alignment.max_pairs per language; with it
    off only the PROBE_PAIRS per language the log measures, and files that are missing then only cost the
    probes (a note says so), never the run.
    """
    from dsxfer.data.readers import read_parallel
    from dsxfer.data.tasks import tatoeba_files, tatoeba_pairs

    a, d = cfg.alignment, cfg.data
    full = a.enabled or d.induce_lexicon
    cap = a.max_pairs if full else PROBE_PAIRS
    why = (f"alignment.max_pairs={a.max_pairs} per language" if full else
           f"the alignment loss is off: only the first {PROBE_PAIRS} per language, read as probes for align/cosine/<lang>, never trained on")
    if a.src_file:
        files = {"custom": (Path(a.src_file), Path(a.tgt_file))}
    else:
        try:
            files = {lang: tatoeba_files(lang, d.data_dir) for lang in a.target_langs}
        except DsxferError as e:  # no data folder at all
            if full:
                raise
            notes.append(f"alignment probes: none logged (no align/cosine/*): {e}")
            return {}
    if not full:
        missing = {lang: next(str(f) for f in pair if not f.is_file()) for lang, pair in files.items() if not all(f.is_file() for f in pair)}
        if missing:
            source = "alignment.src_file/tgt_file" if a.src_file else "Tatoeba files for alignment.target_langs"
            notes.append(f"alignment probes: no align/cosine/ for {', '.join(missing)}: {source} not found "
                         f"({'; '.join(missing.values())}); the alignment loss is off, so the run goes on without them")
            files = {lang: pair for lang, pair in files.items() if lang not in missing}
    read = {}
    for lang, (src, tgt) in files.items():
        if a.src_file:
            read[lang] = _kept(read_parallel(src, tgt, "custom", on_error=d.on_error), skipped)
        else:
            read[lang] = _kept(tatoeba_pairs(lang, d.data_dir, on_error=d.on_error), skipped)
    if read:
        notes.append("parallel pairs: " + ", ".join(f"{lang} {min(cap, len(ps))}" + (f" of {len(ps)}" if len(ps) > cap else "")
                                                    for lang, ps in read.items()) + f" ({why})")
    return {lang: ps[:cap] for lang, ps in read.items()}


def _source_examples(cfg, skipped: list, notes: list) -> tuple[list, list]:
    """(training pool, held-out source dev set) of the source language.

    XTREME's TyDi QA GoldP dev ships without answers, so the source dev set for early stopping is a
    seeded hold-out of `data.dev_examples` questions from the source training file: never trained on,
    never target-language data.
    """
    from dsxfer.data.readers import read_jsonl, read_pawsx_tsv, read_squad_json
    from dsxfer.data.tasks import get_task, load_task

    d = cfg.data
    kind = cfg.model.task
    if d.train_files:
        items = []
        for f in d.train_files:
            if f.endswith(".jsonl"):
                items += _kept(read_jsonl(f, kind, d.source_lang, on_error=d.on_error), skipped)
            elif kind == "qa":
                items += _kept(read_squad_json(f, d.source_lang, on_error=d.on_error), skipped)
            else:
                items += _kept(read_pawsx_tsv(f, d.source_lang, on_error=d.on_error), skipped)
    else:
        spec = get_task(d.train_task)
        if spec.kind != kind:
            raise ConfigError(f"config value data.train_task={d.train_task} is a {spec.kind} task but model.task={kind}; make them agree")
        split = "train" if d.train_task == "tydiqa" else None
        items = _kept(load_task(d.train_task, d.source_lang, split, data_dir=d.data_dir, on_error=d.on_error), skipped)

    ids = sorted({ex.id for ex in items})
    n_dev = min(d.dev_examples, len(ids) // 5)  # never more than a fifth of the pool
    if n_dev < d.dev_examples:
        notes.append(f"source dev set: {n_dev} of the data.dev_examples={d.dev_examples} questions held out "
                     f"(at most a fifth of the {len(ids)} source questions)")
    else:
        notes.append(f"source dev set: {n_dev} of the {len(ids)} source questions held out (data.dev_examples), never trained on")
    dev_ids = set(random.Random(f"{cfg.train.seed}:dev").sample(ids, n_dev)) if n_dev else set()
    pool = [ex for ex in items if ex.id not in dev_ids]
    dev = [ex for ex in items if ex.id in dev_ids]
    if d.max_train_examples is not None and len(pool) > d.max_train_examples:
        notes.append(f"source training pool: {d.max_train_examples} of {len(pool)} questions (data.max_train_examples; "
                     f"{len(dev)} more are the source dev set)")
        keep = set(random.Random(f"{cfg.train.seed}:train").sample(sorted(ex.id for ex in pool), d.max_train_examples))
        pool = [ex for ex in pool if ex.id in keep]
    elif d.max_train_examples is not None:
        notes.append(f"source training pool: all {len(pool)} questions (data.max_train_examples={d.max_train_examples} "
                     f"is more than the {len(ids)} in the file minus the {len(dev)} of the source dev set)")
    else:
        notes.append(f"source training pool: all {len(pool)} questions (data.max_train_examples unset; "
                     f"{len(dev)} more are the source dev set)")
    return pool, dev


def _eval_examples(cfg) -> dict[str, list]:
    """The evaluation test sets the run will be scored on (for the overlap check only)."""
    from dsxfer.data.tasks import get_task, load_task, parse_langs

    out = {}
    for task in cfg.eval.tasks:
        spec = get_task(task)
        if spec.kind != cfg.model.task or task == "tydiqa":
            continue
        for lang in parse_langs(task, cfg.eval.langs if cfg.eval.langs == "all" else list(cfg.eval.langs)):
            out[f"{task}/{lang}"] = list(load_task(task, lang, data_dir=cfg.data.data_dir))
    return out


def _row_split(cfg, pool: list, dev: list, evals: dict[str, list], notes: list) -> tuple[list, list, dict, list, set]:
    """A task that is both trained on and evaluated (PAWS-X dev) is split by row id, the same rows held out
    in every language: training keeps one half, the evaluation test rows are the other half.

    Returns (pool, dev, evals, split tasks, held-out row ids), each narrowed to its side of the split.
    """
    d = cfg.data
    split_tasks = sorted({key.split("/")[0] for key in evals} & {d.train_task, d.shot_task})
    if not split_tasks:
        return pool, dev, evals, split_tasks, set()
    from dsxfer.data.tasks import split_rows

    shared = sorted({ex.id for key, exs in evals.items() if key.split("/")[0] in (d.train_task, d.shot_task) for ex in exs})
    _, test_ids = split_rows(shared, test_fraction=0.5, seed=cfg.train.seed)
    held_out = set(test_ids)
    evals = {key: [ex for ex in exs if ex.id in held_out] if key.split("/")[0] in (d.train_task, d.shot_task) else exs
             for key, exs in evals.items()}
    n_pool, n_dev = len(pool), len(dev)
    pool = [ex for ex in pool if ex.id not in held_out]
    dev = [ex for ex in dev if ex.id not in held_out]
    notes.append(f"row split: {', '.join(split_tasks)} is both trained on and evaluated, so {len(held_out)} of its {len(shared)} "
                 f"row ids are held out as test rows in every language (test_rows.json); that leaves {len(pool)} of the "
                 f"{n_pool} source training questions and {len(dev)} of the {n_dev} source dev questions")
    return pool, dev, evals, split_tasks, held_out


def _k_shots(cfg, evals: dict[str, list], skipped: list, notes: list) -> dict[str, list]:
    """k target-language shots per language, never drawn from rows of an evaluation set."""
    from dsxfer.data.sampling import sample_k_shot
    from dsxfer.data.tasks import load_task

    d = cfg.data
    shots: dict[str, list] = {}
    if d.k_shot <= 0:
        return shots
    drawn_from = []
    for lang in d.target_langs:
        shot_pool = _kept(load_task(d.shot_task, lang, data_dir=d.data_dir, on_error=d.on_error), skipped)
        banned = {ex.id for key, exs in evals.items() if key.startswith(f"{d.shot_task}/") for ex in exs}
        shots[lang] = sample_k_shot(shot_pool, d.k_shot, cfg.train.seed, lang=lang, exclude=sorted(banned),
                                    balanced=cfg.model.task == "classification")
        candidates = sum(ex.id not in banned for ex in shot_pool)
        drawn_from.append(f"{lang} from {candidates} rows" + (f" ({len(shot_pool) - candidates} of the {len(shot_pool)} are "
                                                               "evaluation rows, never drawn)" if candidates < len(shot_pool) else ""))
    notes.append(f"k-shot: {d.k_shot} {d.shot_task} shots per target language (data.k_shot"
                 f"{', class-balanced' if cfg.model.task == 'classification' else ''}): {'; '.join(drawn_from)}")
    return shots


def _task_batches(cfg, training: list, tokenizer, reserved: int, notes: list) -> Batches:
    """The task features of the training examples: QA windows or sentence pairs, right-padded per batch."""
    pad = pad_token_id(tokenizer)
    if cfg.model.task == "qa":
        feats = featurize_qa(training, tokenizer, max_length=cfg.model.max_length, doc_stride=cfg.model.doc_stride,
                             reserved_tokens=reserved, with_labels=True)
        task = Batches(len(feats), lambda idx: feats.batch(idx, pad, with_labels=True), [len(r) for r in feats.input_ids])
        notes.append(f"task features: {task.n} windows from {len(training)} training examples (a context longer than "
                     f"model.max_length={cfg.model.max_length} minus {reserved} soft-prompt positions is split into "
                     f"overlapping windows, model.doc_stride={cfg.model.doc_stride})")
    else:
        pair_feats = featurize_pairs(training, tokenizer, max_length=cfg.model.max_length, reserved_tokens=reserved)
        task = Batches(len(training), lambda idx: collate_pairs(pair_feats, idx, pad, with_labels=True),
                       [len(r) for r in pair_feats["input_ids"]])
        notes.append(f"task features: {task.n}, one per training example (sentence pairs are truncated to "
                     f"model.max_length={cfg.model.max_length} minus {reserved} soft-prompt positions)")
    return task


def _pair_batches(cfg, pairs_by_lang: dict[str, list], tokenizer, reserved: int) -> tuple[Batches | None, dict, int]:
    """Parallel pairs: the alignment loss's batches (alignment on), the fixed probes the log measures either
    way, and how many pairs train. Returns (align batches | None, probes by language, n pairs)."""
    if not pairs_by_lang:
        return None, {}, 0
    a = cfg.alignment
    pad = pad_token_id(tokenizer)
    pairs = [p for ps in pairs_by_lang.values() for p in ps]
    # the target side gets the soft prompt prepended: keep its real tokens within the budget
    enc = lambda texts, budget: tokenizer(texts, truncation=True, max_length=budget)["input_ids"]
    src_ids = enc([p.src for p in pairs], a.max_length)
    tgt_ids = enc([p.tgt for p in pairs], max(4, a.max_length - reserved))
    pair_ids = [stable_pair_id(f"{p.lang}:{p.id}") for p in pairs]

    def make_align(idx):
        src, tgt = [src_ids[i] for i in idx], [tgt_ids[i] for i in idx]
        mask = lambda rows: right_pad([[1] * len(r) for r in rows], 0)
        return {"align_src_input_ids": right_pad(src, pad), "align_src_attention_mask": mask(src),
                "align_tgt_input_ids": right_pad(tgt, pad), "align_tgt_attention_mask": mask(tgt),
                "align_pair_ids": torch.tensor([pair_ids[i] for i in idx])}

    align = Batches(len(pairs), make_align) if a.enabled else None  # alignment off: never a training batch
    probes, start = {}, 0
    for lang, ps in pairs_by_lang.items():  # a fixed probe of each language's first pairs
        if ps:
            probes[lang] = make_align(list(range(start, start + min(PROBE_PAIRS, len(ps)))))
        start += len(ps)
    return align, probes, len(pairs) if a.enabled else 0


@dataclass
class TrainingRows:
    """The examples a config trains on before featurization, and what decided them."""

    pool: list                     # source training examples (minus the dev hold-out and any held-out test rows)
    dev: list                      # the held-out source dev examples
    shots: dict[str, list]         # target language -> its k shots
    evals: dict[str, list]         # "task/lang" -> the evaluation rows the run is scored on (for the overlap check)
    split_tasks: list[str]         # tasks both trained on and evaluated, split by row id
    held_out: set[str]             # their test row ids
    skipped: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def training_rows(cfg) -> TrainingRows:
    """Source pool, source dev hold-out, row split and k shots, exactly as `build_train_data` draws them;
    the PEFT peers of `dsxfer reproduce` train on these same rows."""
    skipped: list = []
    notes: list[str] = []
    pool, dev = _source_examples(cfg, skipped, notes)
    pool, dev, evals, split_tasks, held_out = _row_split(cfg, pool, dev, _eval_examples(cfg), notes)
    shots = _k_shots(cfg, evals, skipped, notes)
    return TrainingRows(pool, dev, shots, evals, split_tasks, held_out, skipped, notes)


def build_train_data(cfg, model, tokenizer) -> tuple[TrainData, dict[str, Any]]:
    """Readers -> k-shot sampling -> overlap check -> featurization -> TrainData, and what was used.

    `model` is asked only for `num_virtual_tokens` (the positions featurization reserves) and `backbone`
    (lexicon induction for pseudo data). TrainData.dev_eval is left to the caller (evaluation sits above
    data): dsxfer.evaluation.evaluate.source_dev_evaluator scores TrainData.dev_examples.
    """
    from dsxfer.data.augment import pseudo_training_data
    from dsxfer.data.tasks import check_no_overlap

    d = cfg.data
    reserved = int(model.num_virtual_tokens)
    rows = training_rows(cfg)
    pool, dev, shots, evals, skipped, notes = rows.pool, rows.dev, rows.shots, rows.evals, rows.skipped, rows.notes
    split_tasks, held_out = rows.split_tasks, rows.held_out
    pairs_by_lang = _parallel_pairs(cfg, skipped, notes)
    # --- pseudo data: code-switched copies of source examples, translate-train files
    pseudo = pseudo_training_data(cfg, pool, backbone=model.backbone, tokenizer=tokenizer,
                                  pairs=[p for ps in pairs_by_lang.values() for p in ps])
    if pseudo:
        codeswitched = len(pool) * d.codeswitch_copies if d.codeswitch_prob > 0 else 0
        notes.append(f"pseudo data: {len(pseudo)} examples added: {codeswitched} code-switched copies "
                     f"(data.codeswitch_copies={d.codeswitch_copies} of each of the {len(pool)} source questions, "
                     f"data.codeswitch_prob={d.codeswitch_prob}) and {len(pseudo) - codeswitched} from data.translate_train")
    training = pool + [ex for exs in shots.values() for ex in exs] + pseudo
    for key, exs in evals.items():  # rows are translations of each other: compare ids across languages
        check_no_overlap(training, exs, f"training pool ({d.train_task} {d.source_lang} + {d.k_shot}-shot {d.shot_task}) vs {key}")
    task = _task_batches(cfg, training, tokenizer, reserved, notes)
    align, probes, n_pairs = _pair_batches(cfg, pairs_by_lang, tokenizer, reserved)

    used = {"source_examples": len(pool), "source_dev_examples": len(dev), "shots": shots, "test_rows": {"tasks": split_tasks, "ids": sorted(held_out)} if held_out else None,
            "task_features": task.n, "pseudo_examples": len(pseudo), "parallel_pairs": n_pairs, "source_dev_ids": [ex.id for ex in dev],
            "train_rows": {"task": None if d.train_files else d.train_task, "ids": sorted({ex.id for ex in pool})}}
    source_name = ", ".join(Path(f).name for f in d.train_files) if d.train_files else d.train_task
    notes.append(f"data: {len(pool)} {source_name} {d.source_lang} training examples + "
                 f"{sum(len(v) for v in shots.values())} target shots ({d.k_shot} per language from {d.shot_task}: "
                 f"{', '.join(shots) or 'none'}) -> {task.n} features; {len(dev)} held-out source dev examples; "
                 f"{n_pairs} parallel pairs for the alignment loss; no overlap with {', '.join(evals) or 'no evaluation set'}")
    report = skip_report(skipped)
    used["skipped_records"] = report
    return TrainData(task=task, align=align, align_probes=probes, notes=notes, skipped=report, dev_examples=dev), used
