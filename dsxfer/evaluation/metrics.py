"""Evaluation metrics: SQuAD v1.1 EM/F1, MLQA EM/F1 with its per-language normalisation, accuracy.

Written from the published definitions so that the numbers equal what the official scripts print:

- SQuAD v1.1: lower-case, drop ASCII punctuation (string.punctuation), drop the English articles
  a/an/the, collapse whitespace; EM is string equality after that, F1 is the bag-of-tokens overlap of
  the whitespace tokens; each question takes the max over its gold answers; the totals are means x 100
  over every question of the set (a question without a prediction scores 0).
- MLQA: the same pipeline, but punctuation is every Unicode character of category P* (plus
  string.punctuation), articles are per language, and Chinese is tokenised by mixed segmentation
  (each CJK ideograph and each punctuation char its own token, other runs split on whitespace).
  The Arabic rule is the official one: every occurrence of "ال" is replaced by a space, also inside
  a word, and we keep that so our numbers stay comparable with published MLQA results.
"""

from __future__ import annotations

import re
import string
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from dsxfer.errors import DataError

# ---------------------------------------------------------------------------------- SQuAD v1.1

_ASCII_PUNCT = frozenset(string.punctuation)
_EN_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 answer normalisation: lower, strip ASCII punctuation and a/an/the, fix whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCT)
    text = _EN_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, gold: str) -> float:
    return float(squad_normalize(prediction) == squad_normalize(gold))


def squad_f1(prediction: str, gold: str) -> float:
    return _f1(squad_normalize(prediction).split(), squad_normalize(gold).split())


# --------------------------------------------------------------------------------------- MLQA

MLQA_LANGS = ("en", "es", "de", "ar", "hi", "vi", "zh")
_WHITESPACE_LANGS = frozenset({"en", "es", "de", "ar", "hi", "vi"})
_MIXED_SEGMENTATION_LANGS = frozenset({"zh"})

# All Unicode punctuation (general category P*) plus ASCII punctuation (which includes symbols such
# as $ + < = > ^ ` | ~ that Unicode files under S*): the official MLQA set.
_UNICODE_PUNCT = frozenset(
    chr(i) for i in range(sys.maxunicode + 1) if unicodedata.category(chr(i)).startswith("P")
) | _ASCII_PUNCT

_ARTICLES = {
    "en": re.compile(r"\b(a|an|the)\b"),
    "es": re.compile(r"\b(un|una|unos|unas|el|la|los|las)\b"),
    "de": re.compile(r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b"),
    "vi": re.compile(r"\b(của|là|cái|chiếc|những)\b"),
    # The official pattern is '\sال^|ال': the first alternative can never match ('^' after text),
    # so in effect every "ال" is replaced, wherever it stands.
    "ar": re.compile(r"\sال^|ال"),
    "hi": None,  # Hindi has no articles
    "zh": None,  # Chinese has no articles
}
# The CJK range the official script segments character by character.
_CJK = re.compile(r"[\u4e00-\u9fa5]")


def _check_mlqa_lang(lang: str) -> None:
    if lang not in _ARTICLES:
        raise DataError(
            f"MLQA metric: unknown language code '{lang}': MLQA normalisation is defined for "
            f"{', '.join(MLQA_LANGS)}; use the SQuAD metric for other languages"
        )


def mixed_segmentation(text: str) -> list[str]:
    """MLQA's Chinese tokenisation: every CJK ideograph and punctuation char is a token, other runs split on whitespace."""
    tokens: list[str] = []
    run = ""
    for ch in text:
        if _CJK.search(ch) or ch in _UNICODE_PUNCT:
            if run:
                tokens.extend(run.split())
                run = ""
            tokens.append(ch)
        else:
            run += ch
    if run:
        tokens.extend(run.split())
    return tokens


def mlqa_normalize(text: str, lang: str) -> str:
    """MLQA answer normalisation for one of en es de ar hi vi zh (see the module docstring)."""
    _check_mlqa_lang(lang)
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _UNICODE_PUNCT)
    articles = _ARTICLES[lang]
    if articles is not None:
        text = articles.sub(" ", text)
    tokens = mixed_segmentation(text) if lang in _MIXED_SEGMENTATION_LANGS else text.split()
    return " ".join(t for t in tokens if t.strip())


def mlqa_exact_match(prediction: str, gold: str, lang: str) -> float:
    return float(mlqa_normalize(prediction, lang) == mlqa_normalize(gold, lang))


def mlqa_f1(prediction: str, gold: str, lang: str) -> float:
    return _f1(mlqa_normalize(prediction, lang).split(), mlqa_normalize(gold, lang).split())


# ------------------------------------------------------------------------------ set-level scores


def qa_scores(
    gold_answers: Mapping[str, Sequence[str]],
    predictions: Mapping[str, str],
    metric: str = "squad",
    lang: str | None = None,
) -> dict[str, float]:
    """EM and F1 (percent) over every question of gold_answers {id: [gold texts]}.

    metric is "squad" (v1.1) or "mlqa" (needs lang). A question missing from predictions scores 0,
    as in the official scripts; predictions for ids not in the gold set are ignored.
    """
    if metric == "squad":
        em_fn = squad_exact_match
        f1_fn = squad_f1
    elif metric == "mlqa":
        if lang is None:
            raise DataError("MLQA metric needs the language of the answers (lang=en|es|de|ar|hi|vi|zh)")
        _check_mlqa_lang(lang)
        em_fn = lambda p, g: mlqa_exact_match(p, g, lang)  # noqa: E731
        f1_fn = lambda p, g: mlqa_f1(p, g, lang)  # noqa: E731
    else:
        raise DataError(f"unknown QA metric '{metric}': use squad or mlqa")
    if not gold_answers:
        raise DataError("cannot score an empty evaluation set (no questions with gold answers)")
    em = f1 = 0.0
    for qid, golds in gold_answers.items():
        if not golds:
            raise DataError(f"question '{qid}' has no gold answer: it cannot be scored (is this an unlabelled split?)")
        if qid not in predictions:
            continue
        pred = predictions[qid]
        em += max(em_fn(pred, g) for g in golds)
        f1 += max(f1_fn(pred, g) for g in golds)
    n = len(gold_answers)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def accuracy(predictions: Iterable[int], labels: Iterable[int]) -> float:
    """Percentage of positions where prediction == label."""
    preds, golds = list(predictions), list(labels)
    if len(preds) != len(golds):
        raise DataError(f"accuracy: {len(preds)} predictions for {len(golds)} labels; they must be equal")
    if not golds:
        raise DataError("accuracy: no examples to score")
    return 100.0 * sum(int(p == g) for p, g in zip(preds, golds)) / len(golds)


def majority_rate(labels: Iterable[int]) -> float:
    """Accuracy (percent) of always predicting the most frequent of these labels: the floor a classifier must beat."""
    golds = list(labels)
    if not golds:
        raise DataError("majority rate: no labels")
    return 100.0 * max(Counter(golds).values()) / len(golds)
