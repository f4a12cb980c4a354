"""Pseudo data: code-switched copies of source examples, and translate-train files.

Code-switching replaces source words by their translation from a bilingual lexicon with probability p,
giving the model mixed-language inputs whose labels are still known. For QA the answer spans are never
touched and every answer_start is recomputed, so each answer is still found at its offset.

The lexicon is a user TSV (source<TAB>target, one pair a line; the first translation of a word wins), or
is induced from parallel sentences by embedding-based word alignment with the backbone itself:
  1. encode both sides, take a middle layer's token states (multilingual alignment is strongest in the
     middle of the stack), and average the sub-word states of each word (\\w+ spans, via offsets);
  2. in every sentence pair, align source word i with target word j when each is the other's most
     cosine-similar word (mutual argmax, the precise "intersection" alignment);
  3. count the aligned word pairs over the corpus and keep (s, t) when t is s's most frequent partner
     and s is t's most frequent partner (mutual best matches), seen at least min_count times.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from dsxfer.errors import DataError

WORD = re.compile(r"\w+", re.UNICODE)


# ------------------------------------------------------------------------------------- lexicon


def read_lexicon(path: str | Path) -> dict[str, str]:
    """source word (lowercased) -> target word, from a TSV without header."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"lexicon file not found: {p} (data.lexicon must be a TSV: source<TAB>target per line)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"lexicon {p} is not UTF-8 text") from None
    lexicon: dict[str, str] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise DataError(f"lexicon {p} line {lineno}: expected 'source<TAB>target', found {line!r}; fix or remove the line")
        lexicon.setdefault(parts[0].strip().lower(), parts[1].strip())
    if not lexicon:
        raise DataError(f"lexicon {p} holds no word pairs")
    return lexicon


def _word_vectors(texts: Sequence[str], backbone, tokenizer, layer: int, max_length: int, batch_size: int):
    """Per text: (words, (W, H) tensor of mean sub-word states of each \\w+ word)."""
    out = []
    device = next(backbone.parameters()).device
    for lo in range(0, len(texts), batch_size):
        chunk = list(texts[lo:lo + batch_size])
        enc = tokenizer(chunk, return_offsets_mapping=True, truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        offsets = enc.pop("offset_mapping")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            states = backbone(**enc, output_hidden_states=True).hidden_states[layer].float().cpu()
        for b, text in enumerate(chunk):
            spans = [(m.start(), m.end(), m.group(0)) for m in WORD.finditer(text)]
            words, vecs = [], []
            tok_spans = offsets[b].tolist()
            for start, end, word in spans:
                toks = [i for i, (s, e) in enumerate(tok_spans) if e > s and s < end and e > start]
                if toks:
                    words.append(word.lower())
                    vecs.append(states[b, toks].mean(0))
            out.append((words, torch.stack(vecs) if vecs else torch.zeros(0, states.shape[-1])))
    return out


def align_words(src_vecs: torch.Tensor, tgt_vecs: torch.Tensor) -> list[tuple[int, int]]:
    """Mutual-argmax word alignment of one sentence pair from (Ws, H) and (Wt, H) word vectors."""
    if len(src_vecs) == 0 or len(tgt_vecs) == 0:
        return []
    sim = torch.nn.functional.normalize(src_vecs, dim=-1) @ torch.nn.functional.normalize(tgt_vecs, dim=-1).T
    best_t = sim.argmax(1)
    best_s = sim.argmax(0)
    return [(i, int(j)) for i, j in enumerate(best_t.tolist()) if int(best_s[j]) == i]


def induce_lexicon(pairs: Iterable[Any], backbone, tokenizer, *, layer: int = 8, min_count: int = 2,
                   max_length: int = 64, batch_size: int = 32) -> dict[str, str]:
    """Lexicon from parallel pairs (objects with .src and .tgt) by embedding-based word alignment."""
    pairs = list(pairs)
    if not pairs:
        raise DataError("cannot induce a lexicon from zero parallel pairs: give parallel data (alignment.*) or a lexicon file")
    was_training = backbone.training
    backbone.eval()
    src = _word_vectors([p.src for p in pairs], backbone, tokenizer, layer, max_length, batch_size)
    tgt = _word_vectors([p.tgt for p in pairs], backbone, tokenizer, layer, max_length, batch_size)
    backbone.train(was_training)
    counts: Counter[tuple[str, str]] = Counter()
    for (sw, sv), (tw, tv) in zip(src, tgt):
        for i, j in align_words(sv, tv):
            counts[(sw[i], tw[j])] += 1
    by_src: dict[str, Counter] = defaultdict(Counter)
    by_tgt: dict[str, Counter] = defaultdict(Counter)
    for (s, t), c in counts.items():
        by_src[s][t] += c
        by_tgt[t][s] += c
    lexicon = {}
    for s, partners in by_src.items():
        t, c = partners.most_common(1)[0]
        if c >= min_count and by_tgt[t].most_common(1)[0][0] == s:
            lexicon[s] = t
    return lexicon


# ------------------------------------------------------------------------------- code-switching


def _match_case(original: str, translation: str) -> str:
    if original[:1].isupper() and translation[:1].islower():
        return translation[:1].upper() + translation[1:]
    return translation


def codeswitch_text(text: str, lexicon: dict[str, str], prob: float, rng: random.Random,
                    protected: Sequence[tuple[int, int]] = ()) -> tuple[str, list[tuple[int, int, int]]]:
    """Replace words outside the protected [start, end) spans; returns the text and the edits (start, end, delta)."""
    pieces, edits, last = [], [], 0
    for m in WORD.finditer(text):
        start, end = m.span()
        if any(start < pe and end > ps for ps, pe in protected):
            continue
        translation = lexicon.get(m.group(0).lower())
        if translation is None or rng.random() >= prob:
            continue
        new = _match_case(m.group(0), translation)
        pieces += [text[last:start], new]
        edits.append((start, end, len(new) - (end - start)))
        last = end
    pieces.append(text[last:])
    return "".join(pieces), edits


def _shift(offset: int, edits: list[tuple[int, int, int]]) -> int:
    return offset + sum(delta for start, _, delta in edits if start < offset)


def codeswitch_qa(example, lexicon: dict[str, str], prob: float, rng: random.Random, copy_index: int = 0):
    """A code-switched copy of a QAExample; the answers are untouched and found at the new answer_starts."""
    spans = [(s, s + len(a)) for a, s in zip(example.answers, example.answer_starts)]
    context, edits = codeswitch_text(example.context, lexicon, prob, rng, protected=spans)
    question, _ = codeswitch_text(example.question, lexicon, prob, rng)
    starts = tuple(_shift(s, edits) for s in example.answer_starts)
    for a, s in zip(example.answers, starts):
        if context[s:s + len(a)] != a:  # cannot happen unless the edits overlap a span: a bug, not bad input
            raise AssertionError(f"code-switching moved answer {a!r} of {example.id}")
    return replace(example, id=f"{example.id}#cs{copy_index}", context=context, question=question, answer_starts=starts)


def codeswitch_pair(example, lexicon: dict[str, str], prob: float, rng: random.Random, copy_index: int = 0):
    """A code-switched copy of a sentence-pair example (both sentences; the label is kept)."""
    s1, _ = codeswitch_text(example.sentence1, lexicon, prob, rng)
    s2, _ = codeswitch_text(example.sentence2, lexicon, prob, rng)
    return replace(example, id=f"{example.id}#cs{copy_index}", sentence1=s1, sentence2=s2)


def codeswitch_examples(examples: Sequence[Any], lexicon: dict[str, str], *, prob: float, copies: int = 1,
                        seed: int = 0) -> list[Any]:
    """`copies` code-switched copies of every example (QAExample or PairExample), seeded; originals not included."""
    if not 0.0 <= prob <= 1.0:
        raise DataError(f"codeswitch probability {prob} must be in [0, 1] (data.codeswitch_prob)")
    rng = random.Random(seed)
    out = []
    for copy_index in range(copies):
        for ex in examples:
            fn = codeswitch_qa if hasattr(ex, "context") else codeswitch_pair
            out.append(fn(ex, lexicon, prob, rng, copy_index))
    return out


# ------------------------------------------------------------------------------ translate-train


def read_translate_train(paths: Sequence[str | Path], kind: str, *, on_error: str = "raise") -> list[Any]:
    """Extra training examples from translate-train files: SQuAD JSON (.json), PAWS-X TSV (.tsv) or JSONL (.jsonl).

    The language is taken from a name like 'train.de.json' / 'dev-de.tsv' when present. Ids get the file
    name as prefix, so rows of different files never collide with each other or the source data.
    """
    from dsxfer.data import readers

    out = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"translate-train file not found: {p} (data.translate_train lists files of the training task's format)")
        lang_match = re.search(r"[.\-_]([a-z]{2,3})\.(json|tsv|jsonl)$", p.name)
        lang = lang_match.group(1) if lang_match else ""
        if p.suffix == ".jsonl":
            recs = readers.read_jsonl(p, "qa" if kind == "qa" else "classification", lang, on_error=on_error)
        elif p.suffix == ".json" and kind == "qa":
            recs = readers.read_squad_json(p, lang, on_error=on_error)
        elif p.suffix == ".tsv" and kind == "classification":
            recs = readers.read_pawsx_tsv(p, lang, on_error=on_error)
        else:
            raise DataError(f"translate-train file {p}: a {kind} task takes "
                            f"{'SQuAD .json or .jsonl' if kind == 'qa' else 'PAWS-X .tsv or .jsonl'} files")
        out.extend(replace(r, id=f"{p.name}:{r.id}") for r in recs)
    return out


# ------------------------------------------------------------------------------- entry point


def pseudo_training_data(cfg, source_examples: Sequence[Any], *, backbone=None, tokenizer=None,
                         pairs: Iterable[Any] | None = None) -> list[Any]:
    """Every extra training example the config asks for (data.* fields), to append to the source data.

    Code-switched copies when data.codeswitch_prob > 0, with the lexicon from data.lexicon or, when
    data.induce_lexicon is set, induced from `pairs` with `backbone`/`tokenizer`; then the examples of the
    data.translate_train files. Returns [] when the config asks for none.
    """
    d = cfg.data
    extra: list[Any] = []
    if d.codeswitch_prob > 0:
        if d.lexicon:
            lexicon = read_lexicon(d.lexicon)
        elif d.induce_lexicon:
            if backbone is None or tokenizer is None or pairs is None:
                raise DataError("data.induce_lexicon needs the backbone, its tokenizer and the parallel pairs")
            lexicon = induce_lexicon(pairs, backbone, tokenizer)
            if not lexicon:
                raise DataError("the lexicon induced from the parallel pairs is empty: give more pairs (alignment.max_pairs) or data.lexicon")
        else:
            raise DataError("data.codeswitch_prob > 0 needs a lexicon: set data.lexicon to a TSV file or data.induce_lexicon=true")
        extra += codeswitch_examples(source_examples, lexicon, prob=d.codeswitch_prob, copies=d.codeswitch_copies,
                                     seed=cfg.train.seed)
    if d.translate_train:
        extra += read_translate_train(d.translate_train, cfg.model.task, on_error=d.on_error)
    return extra
