"""Readers for the benchmark formats and the user's own files, with every record validated.

- SQuAD v1.1 JSON (XQuAD, MLQA incl. cross-language context/question files, TyDi QA GoldP)
- PAWS-X TSV: the XTREME format without header (sentence1, sentence2, label) and the original
  format with the header id, sentence1, sentence2, label
- line-aligned parallel text (Tatoeba, or any source/target file pair)
- JSONL of the user's own: QA records {id, context, question, answers: [{text, answer_start}]}
  or sentence-pair records {id, sentence1, sentence2, label}

Every reader takes on_error="raise" (stop at the first bad record with a DataError naming the file,
the record or line, the field, what is wrong and what to do) or "skip" (leave the record out and
keep it in the result's `skipped` list, with its reason; readers log the count). Nothing is dropped
silently. Plain json/csv parsing is used because it is several times faster than building Arrow
tables for files this size; `as_dataset` turns records into a `datasets.Dataset` when Arrow caching
and `map` are wanted.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Iterator, Literal, TypeVar

from dsxfer.errors import DataError

log = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
T = TypeVar("T")


@dataclass(frozen=True)
class QAExample:
    """One extractive-QA question. `id` is the row identity shared by translations (XQuAD, MLQA)."""

    id: str
    context: str
    question: str
    answers: tuple[str, ...]  # gold texts; empty for an unlabelled split (TyDi QA dev in XTREME)
    answer_starts: tuple[int, ...]
    lang: str = ""
    title: str = ""


@dataclass(frozen=True)
class PairExample:
    """One sentence-pair classification row. `id` is the row identity shared by translations (PAWS-X)."""

    id: str
    sentence1: str
    sentence2: str
    label: int
    lang: str = ""


@dataclass(frozen=True)
class ParallelPair:
    """One line-aligned translation pair; `id` is stable across runs (the teacher-cache key)."""

    id: str
    src: str
    tgt: str
    lang: str = ""


@dataclass(frozen=True)
class Skipped:
    """A record left out under on_error=skip: where, why (`reason`, without the record's text, so equal
    faults group together) and the full message with the record's values (`detail`)."""

    file: str
    where: str
    reason: str
    detail: str = ""


@dataclass
class Records(Generic[T]):
    """What a reader returns: the good records, and every skipped record with its reason."""

    items: list[T]
    skipped: list[Skipped] = field(default_factory=list)
    source: str = ""
    notes: list[str] = field(default_factory=list)  # changes made while reading (never silent)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __getitem__(self, i: int) -> T:
        return self.items[i]

    def skip_summary(self) -> dict[str, int]:
        """Reason -> count (the reason without the record position), for reports and logs."""
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s.reason] = counts.get(s.reason, 0) + 1
        return counts

    def skip_report(self) -> list[dict[str, Any]]:
        """One entry per reason: its count and the first record it hit, for train.log and summaries."""
        return skip_report(self.skipped)


def skip_report(skipped: list[Skipped]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for s in skipped:
        g = groups.setdefault(s.reason, {"reason": s.reason, "count": 0, "file": s.file,
                                         "example": f"{s.where}: {s.detail or s.reason}"})
        g["count"] += 1
    return list(groups.values())


def format_skip_report(report: list[dict[str, Any]]) -> str:
    """'reason x60 (e.g. line 4: ...); other reason x2 (e.g. ...)'."""
    return "; ".join(f"{g['reason']} x{g['count']} (e.g. {g['example']})" for g in report)


class _Collector:
    """Raise or record a bad record, according to on_error."""

    def __init__(self, path: Path, on_error: OnError):
        if on_error not in ("raise", "skip"):
            raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path = path
        self.on_error = on_error
        self.skipped: list[Skipped] = []

    def bad(self, where: str, reason: str, fix: str, *, detail: str = "") -> None:
        """`reason` names the fault without the record's values; `detail` (if given) is the full message."""
        message = detail or reason
        if self.on_error == "raise":
            raise DataError(f"{self.path}: {where}: {message}; {fix} (or set data.on_error=skip to skip such records)")
        self.skipped.append(Skipped(str(self.path), where, reason, message))

    def finish(self, items: list[T]) -> Records[T]:
        report = skip_report(self.skipped)
        if self.skipped and not items:
            raise DataError(f"{self.path}: every record was skipped ({len(self.skipped)} in all: {format_skip_report(report)}); "
                            "nothing is left to use: fix the file or point to another one")
        if self.skipped:
            log.warning("%s: skipped %d bad record(s): %s", self.path, len(self.skipped), format_skip_report(report))
        return Records(items, self.skipped, str(self.path))


def read_text(path: str | Path) -> str:
    """The file's text; a clear DataError for a missing, empty or non-UTF-8 file."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a file; name the data file inside it")
    if not p.is_file():
        raise DataError(f"{p}: file not found; check the path (data.data_dir, $DSXFER_DATA or the file name)")
    raw = p.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):  # editors on Windows write one; it is not part of the first record
        raw = raw[len(codecs.BOM_UTF8):]
    if not raw.strip():
        raise DataError(f"{p}: the file is empty; point to a file with records")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{p}: line {line} (byte {e.start}): bytes {raw[e.start:e.end]!r} are not UTF-8; "
            "re-save the file as UTF-8 (e.g. iconv -f <encoding> -t utf-8)"
        ) from None


def split_lines(text: str) -> list[str]:
    """Lines separated by \\n only (as `wc -l` counts them): str.splitlines also breaks at U+2028,
    U+0085 and other separators that occur inside real sentences (PAWS-X Korean has them)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _load_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); the file is truncated or corrupt, fix or re-copy it") from None


# ----------------------------------------------------------------------------------- SQuAD JSON


def _qa_record(
    q: Any, context: str, title: str, lang: str, where: str, require_answers: bool, col: _Collector
) -> QAExample | None:
    """Validate one SQuAD `qas` entry; None when it is bad (and skipped)."""
    if not isinstance(q, dict):
        col.bad(where, f"a question must be an object, got {type(q).__name__}", "fix the record")
        return None
    for key, kind in (("id", (str, int)), ("question", str), ("answers", list)):
        if key not in q:
            col.bad(where, f"missing key '{key}'", "every question needs id, question and answers")
            return None
        if not isinstance(q[key], kind):
            col.bad(where, f"field '{key}' has type {type(q[key]).__name__}", "fix the field's type")
            return None
    qid = str(q["id"])
    where = f"{where} (id {qid})"
    texts, starts = [], []
    for j, ans in enumerate(q["answers"]):
        aw = f"{where} answers[{j}]"
        if not isinstance(ans, dict) or "text" not in ans or "answer_start" not in ans:
            col.bad(aw, "an answer needs the keys 'text' and 'answer_start'", "add them")
            return None
        text, start = ans["text"], ans["answer_start"]
        if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
            col.bad(aw, "'text' must be a string and 'answer_start' an integer", "fix the answer")
            return None
        if text == "":
            # XTREME ships TyDi QA dev without gold answers (text "" at 0): an unlabelled question
            continue
        if context[start : start + len(text)] != text:
            found = context[start : start + len(text)]
            col.bad(aw, "field 'text' is not in the context at answer_start",
                    "fix answer_start to the character offset of the answer in the context",
                    detail=f"field 'text' {text!r} is not in the context at answer_start={start} (found {found!r})")
            return None
        texts.append(text)
        starts.append(start)
    if require_answers and not texts:
        col.bad(where, "field 'answers' holds no gold answer", "give at least one answer, or read with require_answers=False")
        return None
    return QAExample(qid, context, q["question"], tuple(texts), tuple(starts), lang, title)


def read_squad_json(
    path: str | Path, lang: str = "", *, on_error: OnError = "raise", require_answers: bool = True
) -> Records[QAExample]:
    """Read a SQuAD v1.1-format file ({data: [{title, paragraphs: [{context, qas}]}]})."""
    p = Path(path)
    col = _Collector(p, on_error)
    doc = _load_json(p)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{p}: top level must be an object with a 'data' list (SQuAD v1.1 format); is this the right file?")
    items: list[QAExample] = []
    positions: list[str] = []  # "article.paragraph" of each item, to qualify repeated ids
    for a, article in enumerate(doc["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            col.bad(f"data[{a}]", "missing key 'paragraphs' (a list)", "every article needs paragraphs")
            continue
        title = str(article.get("title", ""))
        for pi, para in enumerate(article["paragraphs"]):
            pw = f"data[{a}].paragraphs[{pi}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) or not isinstance(para.get("qas"), list):
                col.bad(pw, "a paragraph needs 'context' (a string) and 'qas' (a list)", "add the missing key")
                continue
            for qi, q in enumerate(para["qas"]):
                ex = _qa_record(q, para["context"], title, lang, f"{pw}.qas[{qi}]", require_answers, col)
                if ex is not None:
                    items.append(ex)
                    positions.append(f"{a}.{pi}")
    if not items and not col.skipped:
        raise DataError(f"{p}: holds no questions; point to a file with records")
    items, renamed = _qualify_repeated_ids(items, positions)
    recs = col.finish(items)
    if renamed:
        note = f"{renamed} question(s) share an id with another question; renamed to '<id>@<article>.<paragraph>'"
        log.info("%s: %s", p, note)
        recs.notes.append(note)
    return recs


def _qualify_repeated_ids(items: list[QAExample], positions: list[str]) -> tuple[list[QAExample], int]:
    """XTREME's TyDi QA train numbers questions per article ('0', '1', ...), so ids repeat; ids must be
    unique (predictions and the leakage check join on them), so repeated ids get their position."""
    counts: dict[str, int] = {}
    for ex in items:
        counts[ex.id] = counts.get(ex.id, 0) + 1
    if all(n == 1 for n in counts.values()):
        return items, 0
    out = [dataclasses.replace(ex, id=f"{ex.id}@{pos}") if counts[ex.id] > 1 else ex for ex, pos in zip(items, positions)]
    return out, sum(n for n in counts.values() if n > 1)


# -------------------------------------------------------------------------------------- PAWS-X


PAWSX_LABELS = (0, 1)


def read_pawsx_tsv(
    path: str | Path, lang: str = "", *, on_error: OnError = "raise", labels: tuple[int, ...] = PAWSX_LABELS
) -> Records[PairExample]:
    """Read PAWS-X TSV. Without a header (XTREME) the row id is the 0-based row index, which is the
    same pair in every language; with the header id,sentence1,sentence2,label the id column is used."""
    p = Path(path)
    col = _Collector(p, on_error)
    lines = split_lines(read_text(p))
    header = lines[0].split("\t") if lines else []
    has_header = [h.strip().lower() for h in header] == ["id", "sentence1", "sentence2", "label"]
    ncols = 4 if has_header else 3
    items: list[PairExample] = []
    row = 0
    for lineno, line in enumerate(lines[1:] if has_header else lines, start=2 if has_header else 1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        parts = line.split("\t")
        if len(parts) != ncols:
            col.bad(where, f"expected {ncols} tab-separated fields, found {len(parts)}",
                    "write sentence1<TAB>sentence2<TAB>label (or the header id,sentence1,sentence2,label)")
            row += 1
            continue
        rid, s1, s2, lab = (parts if has_header else [str(row), *parts])
        row += 1
        try:
            label = int(lab.strip())
        except ValueError:
            label = None
        if label not in labels:
            col.bad(where, f"field 'label' is not in the label set {list(labels)}", "fix the label",
                    detail=f"field 'label' is {lab.strip()!r}, not in the label set {list(labels)}")
            continue
        if not s1.strip() or not s2.strip():
            col.bad(where, "field 'sentence1' or 'sentence2' is empty", "give both sentences")
            continue
        items.append(PairExample(rid.strip(), s1, s2, label, lang))
    if not items and not col.skipped:
        raise DataError(f"{p}: holds no records{' below its header' if has_header else ''}; point to a file with records")
    return col.finish(items)


# ----------------------------------------------------------------------------------- parallel


def read_parallel(
    src_path: str | Path, tgt_path: str | Path, lang: str = "", *, on_error: OnError = "raise",
    id_prefix: str | None = None,
) -> Records[ParallelPair]:
    """Read two line-aligned files (line i of src translates line i of tgt). Pair ids are
    '<prefix>:<line index>' so that the same pair has the same id in every run."""
    sp, tp = Path(src_path), Path(tgt_path)
    src_lines = split_lines(read_text(sp))
    tgt_lines = split_lines(read_text(tp))
    if len(src_lines) != len(tgt_lines):
        raise DataError(
            f"{sp} has {len(src_lines)} lines but {tp} has {len(tgt_lines)}: parallel files must be line-aligned "
            "with equal line counts; check that both files belong together"
        )
    col = _Collector(tp, on_error)
    prefix = id_prefix if id_prefix is not None else f"{sp.name}|{tp.name}"
    items = []
    for i, (s, t) in enumerate(zip(src_lines, tgt_lines)):
        if not s.strip() or not t.strip():
            col.bad(f"line {i + 1}", "an empty line in the source or target file", "remove the pair from both files")
            continue
        items.append(ParallelPair(f"{prefix}:{i}", s.strip(), t.strip(), lang))
    return col.finish(items)


# -------------------------------------------------------------------------------------- JSONL


def read_jsonl(
    path: str | Path, kind: Literal["qa", "classification"], lang: str = "", *, on_error: OnError = "raise",
    labels: tuple[int, ...] | None = None,
) -> Records[Any]:
    """The user's own data, one JSON object per line (see the module docstring for the fields)."""
    p = Path(path)
    col = _Collector(p, on_error)
    items: list[Any] = []
    for lineno, line in enumerate(split_lines(read_text(p)), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            col.bad(where, f"not valid JSON ({e.msg})", "write one JSON object per line")
            continue
        if not isinstance(rec, dict):
            col.bad(where, "a line must hold a JSON object", "write one object per line")
            continue
        rec_lang = str(rec.get("lang", lang))
        if kind == "qa":
            if not isinstance(rec.get("context"), str):
                col.bad(where, "missing key 'context' (a string)", "every QA record needs context, question, answers")
                continue
            if "id" not in rec:
                col.bad(where, "missing key 'id'", "give every record a unique id")
                continue
            ex = _qa_record(rec, rec["context"], str(rec.get("title", "")), rec_lang, where, True, col)
            if ex is not None:
                items.append(ex)
        elif kind == "classification":
            missing = [k for k in ("id", "sentence1", "sentence2", "label") if k not in rec]
            if missing:
                col.bad(where, f"missing key '{missing[0]}'", "every record needs id, sentence1, sentence2, label")
                continue
            label = rec["label"]
            if not isinstance(label, int) or isinstance(label, bool) or (labels is not None and label not in labels):
                col.bad(where, f"field 'label' is not in the label set {list(labels or [])}", "fix the label",
                        detail=f"field 'label' is {label!r}, not in the label set {list(labels or [])}")
                continue
            items.append(PairExample(str(rec["id"]), str(rec["sentence1"]), str(rec["sentence2"]), label, rec_lang))
        else:
            raise DataError(f"read_jsonl: kind must be 'qa' or 'classification', got {kind!r}")
    if not items and not col.skipped:
        raise DataError(f"{p}: holds no records; point to a file with records")
    return col.finish(items)


def check_unique_ids(records: Records[Any] | list[Any], what: str) -> None:
    """Ids are the join key of predictions and the leakage check: duplicates are an error."""
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise DataError(f"{what}: id '{r.id}' occurs more than once; ids must be unique within a file")
        seen.add(r.id)


def as_dataset(records: Records[Any] | list[Any]):
    """A `datasets.Dataset` of the records (Arrow-backed; use .map for cached featurization)."""
    import datasets

    rows = [dataclasses.asdict(r) for r in records]
    return datasets.Dataset.from_list(rows)
