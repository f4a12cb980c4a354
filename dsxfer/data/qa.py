"""Extractive-QA featurization and post-processing for any HF fast tokenizer, encoder or decoder.

A long context is cut into overlapping windows (`max_length`, overlap `doc_stride`); each window is
one feature: [specials] question [specials] context-window [specials]. The soft prompt's virtual
tokens are not in the features: `reserved_tokens` of the length budget are kept free for them, and
the model returns start/end logits for the real token positions only, so offsets here index real
tokens and never need shifting.

Labels: the answer's first and last token inside the window. A window that does not hold the whole
answer (and an unlabelled question) points both labels at the "null" position: the CLS token for
encoders; for tokenizers without a CLS token (decoders) position 0 (BOS, or the first question token),
a documented convention. Post-processing never returns a span outside the context.
"""

from __future__ import annotations

from collections.abc import Sequence
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dsxfer.data.readers import PairExample, QAExample
from dsxfer.errors import DataError


_WHITESPACE = re.compile(r"\s")


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS (decoders often have none), else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _check_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"QA featurization needs a fast (Rust) tokenizer with offset mapping; got {type(tokenizer).__name__}; load it with use_fast=True")


def right_pad(rows: Sequence[Sequence[int]], value: int):
    """(len(rows), longest row) long tensor: each row's values first, then `value` (the one padding routine:
    task features, sentence pairs and parallel pairs all pad on the right)."""
    import torch

    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


@dataclass
class QAFeatures:
    """Windows of QA examples; per-feature lists, not padded (see `collate`)."""

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    token_type_ids: list[list[int]] | None
    example_index: list[int]  # position of the feature's example in the featurized list
    example_id: list[str]
    offset_mapping: list[list[tuple[int, int] | None]]  # None for question/special tokens
    null_index: list[int]
    start_positions: list[int] = field(default_factory=list)  # empty when featurized without labels
    end_positions: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def add_window(self, ex_index: int, ex: "QAExample", ids: list[int], attention_mask: list[int],
                   token_type_ids: list[int] | None, offsets: list, null: int, with_labels: bool) -> None:
        """Append one window of example `ex` (labelled from its gold answer when with_labels)."""
        self.input_ids.append(ids)
        self.attention_mask.append(attention_mask)
        if self.token_type_ids is not None:
            self.token_type_ids.append(token_type_ids)
        self.example_index.append(ex_index)
        self.example_id.append(ex.id)
        self.offset_mapping.append(offsets)
        self.null_index.append(null)
        if with_labels:
            start, end = _label_window(ex, offsets, null)
            self.start_positions.append(start)
            self.end_positions.append(end)

    def batch(self, indices: Sequence[int], pad_id: int, with_labels: bool = False):
        """Right-padded torch tensors for the features at indices (the model's task keys)."""
        import torch

        rows = lambda column: [column[i] for i in indices]
        batch = {"input_ids": right_pad(rows(self.input_ids), pad_id), "attention_mask": right_pad(rows(self.attention_mask), 0)}
        if self.token_type_ids is not None:
            batch["token_type_ids"] = right_pad(rows(self.token_type_ids), 0)
        if with_labels:
            if not self.start_positions:
                raise DataError("these QA features were made without labels; featurize with with_labels=True for training")
            batch["start_positions"] = torch.tensor([self.start_positions[i] for i in indices], dtype=torch.long)
            batch["end_positions"] = torch.tensor([self.end_positions[i] for i in indices], dtype=torch.long)
        return batch


def _truncate_questions(questions: list[str], tokenizer: Any, max_question_tokens: int) -> tuple[list[str], int]:
    """Cut questions longer than max_question_tokens at a token boundary (only the context may be
    windowed, so a giant question would otherwise leave no room for it). Also returns the longest
    question length in tokens."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out, longest = [], 0
    for q, offsets in zip(questions, enc["offset_mapping"]):
        if len(offsets) > max_question_tokens:
            q = q[: offsets[max_question_tokens - 1][1]]
        out.append(q)
        longest = max(longest, min(len(offsets), max_question_tokens))
    return out, longest


def featurize_qa(
    examples: Sequence[QAExample],
    tokenizer: Any,
    *,
    max_length: int = 384,
    doc_stride: int = 128,
    reserved_tokens: int = 0,
    max_question_tokens: int = 64,
    with_labels: bool = True,
    use_pair_calls: bool = False,
) -> QAFeatures:
    """Windows of every example (see the module docstring). max_length includes reserved_tokens.

    Benchmarks translate one context into many questions (XQuAD: ~5 per paragraph), so each distinct
    context and each question is tokenized once and the windows are assembled from the tokenizer's
    own special-token template, read off a probe pair. The result equals the tokenizer's pair call
    with overflowing windows (tests compare both); use_pair_calls=True, or a tokenizer whose pair
    layout is not [specials] question [specials] context [specials], takes the pair-call path.
    """
    _check_fast(tokenizer)
    template = None if use_pair_calls else _pair_template(tokenizer)
    if template is None:
        return _featurize_with_pair_calls(examples, tokenizer, max_length=max_length, doc_stride=doc_stride,
                                          reserved_tokens=reserved_tokens, max_question_tokens=max_question_tokens,
                                          with_labels=with_labels)
    return _featurize_from_parts(examples, tokenizer, template, max_length=max_length, doc_stride=doc_stride,
                                 reserved_tokens=reserved_tokens, max_question_tokens=max_question_tokens,
                                 with_labels=with_labels)


@dataclass(frozen=True)
class _PairTemplate:
    prefix: list[int]
    middle: list[int]
    suffix: list[int]
    types: tuple[list[int], int, list[int], int, list[int]] | None  # prefix, question, middle, context, suffix


def _pair_template(tokenizer: Any) -> _PairTemplate | None:
    """The special tokens before, between and after (question, context), or None when the tokenizer's
    pair encoding is not that simple layout or is not the concatenation of the separate encodings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    first, second = "What is it?", "It is a probe."
    enc = tokenizer(first, second)
    ids, seq = enc["input_ids"], enc.sequence_ids(0)
    q_pos = [i for i, s in enumerate(seq) if s == 0]
    c_pos = [i for i, s in enumerate(seq) if s == 1]
    if not q_pos or not c_pos or q_pos != list(range(q_pos[0], q_pos[-1] + 1)) or c_pos != list(range(c_pos[0], c_pos[-1] + 1)):
        return None
    if q_pos[-1] >= c_pos[0] or any(s is not None for i, s in enumerate(seq) if i not in q_pos and i not in c_pos):
        return None
    q_ids = backend.encode(first, add_special_tokens=False).ids
    c_ids = backend.encode(second, add_special_tokens=False).ids
    if [ids[i] for i in q_pos] != q_ids or [ids[i] for i in c_pos] != c_ids:
        return None
    qa, qb, ca, cb = q_pos[0], q_pos[-1] + 1, c_pos[0], c_pos[-1] + 1
    types = None
    if "token_type_ids" in enc:
        t = enc["token_type_ids"]
        if len(set(t[qa:qb])) != 1 or len(set(t[ca:cb])) != 1:
            return None
        types = (t[:qa], t[qa], t[qb:ca], t[ca], t[cb:])
    return _PairTemplate(ids[:qa], ids[qb:ca], ids[cb:], types)


def _featurize_from_parts(
    examples: Sequence[QAExample], tokenizer: Any, template: _PairTemplate, *, max_length: int, doc_stride: int,
    reserved_tokens: int, max_question_tokens: int, with_labels: bool,
) -> QAFeatures:
    budget = max_length - reserved_tokens
    backend = tokenizer.backend_tokenizer
    n_special = len(template.prefix) + len(template.middle) + len(template.suffix)
    cls_id = tokenizer.cls_token_id
    contexts = list(dict.fromkeys(ex.context for ex in examples))
    context_index = {c: i for i, c in enumerate(contexts)}
    context_encs = backend.encode_batch(contexts, add_special_tokens=False)
    context_ids = [e.ids for e in context_encs]
    context_spans = [_trimmed_spans(c, e.offsets) for c, e in zip(contexts, context_encs)]
    question_ids = [e.ids[:max_question_tokens] for e in
                    backend.encode_batch([ex.question.lstrip() for ex in examples], add_special_tokens=False)]
    longest = max((len(q) for q in question_ids), default=0)
    if budget - longest - n_special <= doc_stride:
        raise DataError(_budget_message(max_length, reserved_tokens, budget, longest, max_question_tokens, n_special, doc_stride))

    feats = QAFeatures([], [], [] if template.types is not None else None, [], [], [], [])
    for ex_index, (ex, q_ids) in enumerate(zip(examples, question_ids)):
        c = context_index[ex.context]
        c_ids, c_spans = context_ids[c], context_spans[c]
        head = template.prefix + q_ids + template.middle
        window = budget - len(head) - len(template.suffix)
        start = 0
        while True:  # windows of `window` context tokens, each starting doc_stride tokens before the last ended
            stop = min(start + window, len(c_ids))
            ids = head + c_ids[start:stop] + template.suffix
            offsets = [None] * len(head) + c_spans[start:stop] + [None] * len(template.suffix)
            null = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
            types = None
            if template.types is not None:
                pre, q_type, mid, c_type, suf = template.types
                types = pre + [q_type] * len(q_ids) + mid + [c_type] * (stop - start) + suf
            feats.add_window(ex_index, ex, ids, [1] * len(ids), types, offsets, null, with_labels)
            if stop >= len(c_ids):
                break
            start = stop - doc_stride
    return feats


def _trimmed_spans(context: str, offsets: list) -> list[tuple[int, int]]:
    """Character spans of context tokens without surrounding whitespace (see _context_offsets)."""
    trimmed = _context_offsets(context, offsets, [1] * len(offsets), _whitespace_mask(context))
    return trimmed  # type: ignore[return-value]  # every position is a context token here


def _budget_message(max_length, reserved_tokens, budget, longest, max_question_tokens, n_special, doc_stride) -> str:
    return (f"QA windows do not fit: max_length={max_length} - reserved_tokens={reserved_tokens} leaves {budget} tokens, "
            f"which must exceed the longest question ({longest} tokens, at most max_question_tokens={max_question_tokens}) "
            f"+ specials ({n_special}) + doc_stride ({doc_stride}); raise model.max_length or lower model.doc_stride / prompts.length")


def _featurize_with_pair_calls(
    examples: Sequence[QAExample], tokenizer: Any, *, max_length: int, doc_stride: int, reserved_tokens: int,
    max_question_tokens: int, with_labels: bool, chunk_size: int = 1000,
) -> QAFeatures:
    """The tokenizer's own pair call with overflowing windows (the reference for the fast path)."""
    budget = max_length - reserved_tokens
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    cls_id = tokenizer.cls_token_id
    space_masks: dict[int, np.ndarray] = {}  # whitespace mask of the current example's context
    feats = QAFeatures([], [], None, [], [], [], [])
    for lo in range(0, len(examples), chunk_size):
        chunk = examples[lo : lo + chunk_size]
        questions, longest = _truncate_questions([ex.question.lstrip() for ex in chunk], tokenizer, max_question_tokens)
        if budget - longest - n_special <= doc_stride:
            raise DataError(_budget_message(max_length, reserved_tokens, budget, longest, max_question_tokens, n_special, doc_stride))
        enc = tokenizer(
            questions, [ex.context for ex in chunk], truncation="only_second", max_length=budget,
            stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
        )
        if lo == 0 and "token_type_ids" in enc:  # BERT-style tokenizers mark question vs context
            feats.token_type_ids = []
        for f, sample in enumerate(enc["overflow_to_sample_mapping"]):
            ex_index = lo + sample
            ex = examples[ex_index]
            ids = enc["input_ids"][f]
            seq = enc.sequence_ids(f)
            if ex_index not in space_masks:
                space_masks = {ex_index: _whitespace_mask(ex.context)}
            offsets = _context_offsets(ex.context, enc["offset_mapping"][f], seq, space_masks[ex_index])
            null = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
            types = enc["token_type_ids"][f] if feats.token_type_ids is not None else None
            feats.add_window(ex_index, ex, ids, enc["attention_mask"][f], types, offsets, null, with_labels)
    return feats


def _whitespace_mask(text: str) -> np.ndarray:
    mask = np.zeros(max(len(text), 1), dtype=bool)
    mask[[m.start() for m in _WHITESPACE.finditer(text)]] = True
    return mask


def _context_offsets(context: str, offsets: list, sequence_ids: list, is_space: np.ndarray) -> list[tuple[int, int] | None]:
    """Character spans of the context tokens (None elsewhere), trimmed of surrounding whitespace:
    SentencePiece-style pieces ("▁word") include the space before the word, which would otherwise
    end up at the edge of a decoded answer. is_space[i] tells whether context[i] is whitespace."""
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    in_context = np.asarray([s == 1 for s in sequence_ids])
    start, end = spans[:, 0].copy(), spans[:, 1].copy()
    last = len(is_space) - 1  # question tokens carry question offsets: clip, they are masked anyway
    # a piece rarely carries more than one space, so a few vectorised passes suffice
    for _ in range(8):
        move = in_context & (start < end) & is_space[np.clip(start, 0, last)]
        if not move.any():
            break
        start += move
    for _ in range(8):
        move = in_context & (end > start) & is_space[np.clip(end - 1, 0, last)]
        if not move.any():
            break
        end -= move
    return [(int(a), int(b)) if c else None for a, b, c in zip(start.tolist(), end.tolist(), in_context.tolist())]


def _label_window(ex: QAExample, offsets: list[tuple[int, int] | None], null: int) -> tuple[int, int]:
    """Token positions of the first gold answer in this window, or (null, null)."""
    if not ex.answers:
        return null, null
    start_char = ex.answer_starts[0]
    end_char = start_char + len(ex.answers[0])
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return null, null
    # first token: the last one starting at or before the answer start; last token: the first one
    # ending at or after the answer end
    token_start = token_end = None
    for i in ctx:
        if offsets[i][0] <= start_char:
            token_start = i
        if token_end is None and offsets[i][1] >= end_char:
            token_end = i
    if token_end < token_start:  # an answer inside one token
        token_end = token_start
    return token_start, token_end


def postprocess_qa(
    examples: Sequence[QAExample],
    features: QAFeatures,
    start_logits: Sequence[np.ndarray],
    end_logits: Sequence[np.ndarray],
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """{example id: answer text}: the best-scoring valid span (start <= end, both in the context, at
    most max_answer_length tokens) over the n_best starts and ends of every window of the example,
    cut from the original context by the offset mapping. An example with no valid span gets ""."""
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise DataError(f"post-processing: {len(start_logits)} start / {len(end_logits)} end logit rows for {len(features)} features")
    best: dict[int, tuple[float, str]] = {}
    for f in range(len(features)):
        offsets = features.offset_mapping[f]
        n = len(offsets)
        sl = np.asarray(start_logits[f], dtype=np.float64)[:n]
        el = np.asarray(end_logits[f], dtype=np.float64)[:n]
        in_context = np.fromiter((o is not None for o in offsets), bool, n)
        starts = np.argsort(-sl, kind="stable")[:n_best]
        ends = np.argsort(-el, kind="stable")[:n_best]
        # all n_best x n_best (start, end) pairs at once; invalid pairs get -inf
        length = ends[None, :] - starts[:, None] + 1
        valid = in_context[starts][:, None] & in_context[ends][None, :] & (length >= 1) & (length <= max_answer_length)
        if not valid.any():
            continue
        scores = np.where(valid, sl[starts][:, None] + el[ends][None, :], -np.inf)
        i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
        score = float(scores[i, j])
        ex_index = features.example_index[f]
        if ex_index not in best or score > best[ex_index][0]:
            start_char = offsets[starts[i]][0]
            end_char = offsets[ends[j]][1]
            best[ex_index] = (score, examples[ex_index].context[start_char:end_char])
    return {ex.id: best[i][1] if i in best else "" for i, ex in enumerate(examples)}


# ----------------------------------------------------------------------- sentence-pair classification


def featurize_pairs(
    examples: Sequence[PairExample], tokenizer: Any, *, max_length: int = 128, reserved_tokens: int = 0
) -> dict[str, list]:
    """input_ids, attention_mask (token_type_ids when the tokenizer gives them) and labels; each pair
    holds at most max_length - reserved_tokens real tokens (the longer sentence is cut first)."""
    budget = max_length - reserved_tokens
    if budget <= tokenizer.num_special_tokens_to_add(pair=True) + 2:
        raise DataError(f"max_length={max_length} - reserved_tokens={reserved_tokens} leaves no room for a sentence pair; raise model.max_length")
    enc = tokenizer([e.sentence1 for e in examples], [e.sentence2 for e in examples], truncation="longest_first", max_length=budget)
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": [e.label for e in examples],
           "example_id": [e.id for e in examples]}
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    return out


def collate_pairs(features: dict[str, list], indices: Sequence[int], pad_id: int, with_labels: bool = True):
    """Right-padded tensors of the pair features at indices."""
    import torch

    batch = {key: right_pad([features[key][i] for i in indices], value)
             for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)) if key in features}
    if with_labels:
        batch["labels"] = torch.tensor([features["labels"][i] for i in indices], dtype=torch.long)
    return batch
