"""Task registry: where each benchmark's files are, its languages and metric, and leakage-free splits.

The data folder is config data.data_dir, else $DSXFER_DATA, else <repo>/../shared/data.

Leakage rules (see the data README):
- XQuAD and PAWS-X rows are translations of one another: a row has the same identity (question id,
  row index) in every language. A training pool and a test set are therefore split by row identity,
  the same rows held out in every language, and the overlap check compares ids, never languages.
- MLQA dev shares question ids across its language versions too; TyDi QA train and dev are disjoint.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dsxfer.data.readers import (
    OnError, PairExample, ParallelPair, QAExample, Records, check_unique_ids, read_parallel, read_pawsx_tsv,
    read_squad_json,
)
from dsxfer.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """data.data_dir, else $DSXFER_DATA, else <repo>/../shared/data; must exist."""
    if data_dir:
        chosen, how = Path(data_dir), "data.data_dir"
    elif os.environ.get("DSXFER_DATA"):
        chosen, how = Path(os.environ["DSXFER_DATA"]), "$DSXFER_DATA"
    else:
        chosen, how = (REPO_ROOT.parent / "shared" / "data").resolve(), "the default <repo>/../shared/data"
    if not chosen.is_dir():
        raise DataError(f"data folder {chosen} (from {how}) does not exist; set data.data_dir or $DSXFER_DATA to the benchmark data folder")
    return chosen


@dataclass(frozen=True)
class TaskSpec:
    name: str
    display: str  # how result tables name the evaluation data
    kind: Literal["qa", "classification"]
    metric: Literal["squad", "mlqa", "accuracy"]
    langs: tuple[str, ...]  # languages with an evaluation file
    splits: tuple[str, ...]
    labels: tuple[int, ...] = ()


TASKS: dict[str, TaskSpec] = {
    "xquad": TaskSpec("xquad", "XQuAD", "qa", "squad",
                      ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh"), ("test",)),
    "mlqa": TaskSpec("mlqa", "MLQA dev", "qa", "mlqa", ("en", "es", "de", "ar", "hi", "vi", "zh"), ("dev",)),
    "pawsx": TaskSpec("pawsx", "PAWS-X dev", "classification", "accuracy",
                      ("de", "en", "es", "fr", "ja", "ko", "zh"), ("dev",), labels=(0, 1)),
    # XTREME's TyDi QA GoldP dev carries no gold answers: it cannot be scored, only read
    "tydiqa": TaskSpec("tydiqa", "TyDi QA GoldP", "qa", "squad",
                       ("ar", "bn", "en", "fi", "id", "ko", "ru", "sw", "te"), ("train", "dev")),
}
TYDIQA_TRAIN_LANGS = ("en", "ko", "sw")


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise DataError(f"unknown task '{name}': choose one of {', '.join(TASKS)}")
    return TASKS[name]


def parse_langs(task: str, langs: str | Sequence[str]) -> list[str]:
    """'all' -> the task's languages; 'de,es' or ['de','es'] -> checked list (MLQA also takes 'de-en':
    context German, question English)."""
    spec = get_task(task)
    if isinstance(langs, str):
        if langs == "all":
            return list(spec.langs)
        langs = [x.strip() for x in langs.split(",") if x.strip()]
    out = []
    for lang in langs:
        lang = str(lang)
        parts = lang.split("-") if task == "mlqa" else [lang]
        for part in parts:
            if part not in spec.langs:
                raise DataError(f"unknown language code '{part}' for task {task}: choose from {', '.join(spec.langs)} (or 'all')")
        out.append(lang)
    if not out:
        raise DataError(f"no languages given for task {task}: pass 'all' or a comma list such as {spec.langs[0]},{spec.langs[1]}")
    return out


def task_file(task: str, lang: str, split: str | None = None, data_dir: str | Path | None = None) -> Path:
    """The bundled file of a task/language/split (MLQA lang 'de-en' = context de, question en)."""
    spec = get_task(task)
    split = split or spec.splits[-1]
    if split not in spec.splits:
        raise DataError(f"task {task} has no split '{split}': choose from {', '.join(spec.splits)}")
    root = resolve_data_dir(data_dir)
    if task == "mlqa":
        ctx, _, q = lang.partition("-")
        q = q or ctx
        parse_langs("mlqa", [ctx, q])
        return root / "mlqa" / "dev" / f"dev-context-{ctx}-question-{q}.json"
    parse_langs(task, [lang])
    if task == "xquad":
        return root / "xquad" / f"xquad.{lang}.json"
    if task == "pawsx":
        return root / "pawsx" / f"dev-{lang}.tsv"
    if split == "train" and lang not in TYDIQA_TRAIN_LANGS:
        raise DataError(f"TyDi QA GoldP has train data only for {', '.join(TYDIQA_TRAIN_LANGS)}, not '{lang}'")
    return root / "tydiqa" / f"tydiqa.goldp.{lang}.{split}.json"


def load_task(
    task: str, lang: str, split: str | None = None, *, data_dir: str | Path | None = None,
    on_error: OnError = "raise",
) -> Records[QAExample] | Records[PairExample]:
    """Read one task/language/split with validation; ids are checked to be unique."""
    spec = get_task(task)
    path = task_file(task, lang, split, data_dir)
    if spec.kind == "classification":
        recs = read_pawsx_tsv(path, lang, on_error=on_error, labels=spec.labels)
    else:
        unlabelled = task == "tydiqa" and (split or spec.splits[-1]) == "dev"
        question_lang = lang.partition("-")[2] or lang
        recs = read_squad_json(path, question_lang, on_error=on_error, require_answers=not unlabelled)
    check_unique_ids(recs, str(path))
    return recs


def tatoeba_files(lang: str, data_dir: str | Path | None = None) -> tuple[Path, Path]:
    """The (English, lang) line-aligned files of Tatoeba's lang-eng pairs (they may not exist)."""
    root = resolve_data_dir(data_dir) / "tatoeba"
    return root / f"tatoeba.{lang}-eng.eng", root / f"tatoeba.{lang}-eng.{lang}"


def tatoeba_pairs(
    lang: str, data_dir: str | Path | None = None, *, max_pairs: int | None = None, on_error: OnError = "raise"
) -> Records[ParallelPair]:
    """Tatoeba pairs English (src) -> lang (tgt, an ISO 639-3 code such as deu)."""
    src, tgt = tatoeba_files(lang, data_dir)
    root = src.parent
    if not tgt.is_file():
        known = sorted(p.name.split(".")[1].split("-")[0] for p in root.glob("tatoeba.*-eng.eng"))
        raise DataError(f"unknown language code '{lang}' for Tatoeba (ISO 639-3 expected, e.g. deu, fra, cmn); available: {' '.join(known)}")
    recs = read_parallel(src, tgt, lang, on_error=on_error, id_prefix=f"tatoeba-{lang}")
    if max_pairs is not None:
        recs.items = recs.items[:max_pairs]
    return recs


# ----------------------------------------------------------------------------------- leakage


def row_identity(record: QAExample | PairExample | str) -> str:
    """What identifies a row across its translations: the question id / PAWS-X row id, not the language."""
    return record if isinstance(record, str) else record.id


def check_no_overlap(
    train: Iterable[QAExample | PairExample | str], test: Iterable[QAExample | PairExample | str],
    what: str = "training pool vs test set",
) -> None:
    """Raise DataError when any row identity appears in both (regardless of language)."""
    train_ids = {row_identity(r) for r in train}
    overlap = sorted(train_ids & {row_identity(r) for r in test})
    if overlap:
        examples = ", ".join(overlap[:5])
        raise DataError(
            f"{what}: {len(overlap)} row id(s) are in both the training pool and the test set (e.g. {examples}); "
            "XQuAD/PAWS-X/MLQA rows are translations of each other, so split by row id across all languages "
            "(dsxfer.data.split_rows)"
        )


def split_rows(
    ids: Sequence[str], test_fraction: float = 0.5, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split row identities into (train_ids, test_ids), seeded; apply the same split to every language
    (PAWS-X rows by index, XQuAD rows by question id), so no translation of a test row is trained on."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    unique = sorted(set(ids))
    rng = random.Random(seed)
    rng.shuffle(unique)
    n_test = max(1, round(len(unique) * test_fraction))
    test = set(unique[:n_test])
    train_ids = [i for i in ids if i not in test]
    test_ids = [i for i in ids if i in test]
    return list(dict.fromkeys(train_ids)), list(dict.fromkeys(test_ids))
