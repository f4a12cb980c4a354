"""SQuAD v1.1 and MLQA EM/F1 on hand-computed cases (the arithmetic of each case is in its comment)."""

import pytest

from dsxfer.errors import DataError
from dsxfer.evaluation.metrics import (
    accuracy, mixed_segmentation, mlqa_exact_match, mlqa_f1, mlqa_normalize, qa_scores, squad_exact_match, squad_f1,
    squad_normalize,
)


# ------------------------------------------------------------------------------------ SQuAD v1.1


def test_squad_normalisation_order():
    # lower -> "the  cat, sat!" -> no ASCII punct "the  cat sat" -> no article "  cat sat" -> "cat sat"
    assert squad_normalize("The  Cat, sat!") == "cat sat"
    # punctuation goes before articles: "a-b" becomes "ab", which is not an article
    assert squad_normalize("A-B") == "ab"
    # articles only as whole words: "theatre" and "an" inside "banana" stay
    assert squad_normalize("the theatre banana") == "theatre banana"


@pytest.mark.parametrize("pred, gold, em, f1", [
    ("the Eiffel Tower", "Eiffel Tower.", 1.0, 1.0),
    # pred [eiffel tower in paris], gold [eiffel tower]: 2 common, P=2/4, R=1, F1=2*.5*1/1.5=2/3
    ("Eiffel Tower in Paris", "the Eiffel Tower", 0.0, 2 / 3),
    # repeated tokens count once per gold occurrence: common=min(3,1)=1, P=1/3, R=1, F1=0.5
    ("the cat cat cat", "cat", 0.0, 0.5),
    # SQuAD strips ASCII punctuation only: guillemets stay, so no token matches
    ("«Paris»", "Paris", 0.0, 0.0),
    # v1.1 has no special case for empty answers: both normalise to "" -> EM 1, but F1 0 (no common token)
    ("", "the", 1.0, 0.0),
    # SQuAD splits on whitespace only: a Chinese string is one token
    ("北京大学", "北京", 0.0, 0.0),
])
def test_squad_em_f1_cases(pred, gold, em, f1):
    assert squad_exact_match(pred, gold) == em
    assert squad_f1(pred, gold) == pytest.approx(f1)


def test_squad_set_scores_take_max_over_golds_and_count_missing_as_zero():
    gold = {
        "q1": ["Denver Broncos", "The Denver Broncos", "Broncos"],  # "Broncos" matches the third exactly
        "q2": ["Denver Broncos"],  # "Denver": P=1, R=1/2 -> F1 2/3
        "q3": ["Carolina Panthers"],  # no prediction -> 0
    }
    preds = {"q1": "Broncos", "q2": "Denver", "unknown": "ignored"}
    scores = qa_scores(gold, preds, "squad")
    assert scores["exact_match"] == pytest.approx(100 * 1 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)


# ------------------------------------------------------------------------------------------- MLQA


@pytest.mark.parametrize("lang, pred, gold, em, f1", [
    # en: curly quotes are Unicode punctuation (Pi/Pf): removed by MLQA, not by SQuAD
    ("en", "“The Eiffel Tower”", "Eiffel Tower", 1.0, 1.0),
    # de: articles der/die/das/... go; "die römischen verträge" -> "römischen verträge"
    ("de", "Die Römischen Verträge", "römischen Verträge", 1.0, 1.0),
    # de: "dem alten Haus am See" -> [alten haus am see] vs [haus am see]: P=3/4, R=1 -> F1 6/7
    ("de", "dem alten Haus am See", "Haus am See", 0.0, 6 / 7),
    # es: "los" is an article; inverted question mark is punctuation
    ("es", "¿los Estados Unidos?", "Estados Unidos", 1.0, 1.0),
    # es: "él" (he) is not the article "el": kept, so [él dijo] vs [dijo]: P=1/2, R=1 -> F1 2/3
    ("es", "él dijo", "dijo", 0.0, 2 / 3),
    # ar: every "ال" is replaced by a space; the Arabic comma U+060C is punctuation:
    # "القاهرة، مصر" -> [قاهرة مصر] vs "القاهرة" -> [قاهرة]: P=1/2, R=1 -> F1 2/3
    ("ar", "القاهرة، مصر", "القاهرة", 0.0, 2 / 3),
    ("ar", "القاهرة", "قاهرة", 1.0, 1.0),
    # hi: no articles; the danda U+0964 is punctuation; "नई दिल्ली शहर" vs "नई दिल्ली": P=2/3, R=1 -> F1 0.8
    ("hi", "भारत।", "भारत", 1.0, 1.0),
    ("hi", "नई दिल्ली शहर", "नई दिल्ली", 0.0, 0.8),
    # hi: "एक" (one/a) is not an article in MLQA
    ("hi", "एक राजा", "राजा", 0.0, 2 / 3),
    # vi: "những" and "cái" are articles
    ("vi", "những người lính", "người lính", 1.0, 1.0),
    ("vi", "cái bàn gỗ", "bàn", 0.0, 2 / 3),
    # zh: mixed segmentation, one token per ideograph: [北 京 大 学] vs [北 京]: P=2/4, R=1 -> F1 2/3
    ("zh", "北京大学", "北京", 0.0, 2 / 3),
    # zh: book-title brackets are punctuation (Ps/Pe); surrounding spaces vanish
    ("zh", " 《北京》 ", "北京", 1.0, 1.0),
    # zh: a digit run stays one token: [2008 年 奥 运 会] vs [2008 年]: P=2/5, R=1 -> F1 4/7
    ("zh", "2008年奥运会", "2008年", 0.0, 4 / 7),
])
def test_mlqa_em_f1_cases(lang, pred, gold, em, f1):
    assert mlqa_exact_match(pred, gold, lang) == em
    assert mlqa_f1(pred, gold, lang) == pytest.approx(f1)


def test_mlqa_normalisation_details():
    # Arabic: also inside a word ("مال" = m + "ال" -> "م"), as the official rule does
    assert mlqa_normalize("مال", "ar") == "م"
    # German "des" and "einem" are articles, English "a" is not one in German
    assert mlqa_normalize("einem Haus des Volkes a", "de") == "haus volkes a"
    # Latin runs keep their words, each CJK char is a token; lower-casing first
    assert mixed_segmentation("iphone 手机") == ["iphone", "手", "机"]
    assert mlqa_normalize("iPhone手机。", "zh") == "iphone 手 机"


def test_mlqa_set_scores_and_language_errors():
    gold = {"a": ["北京"], "b": ["上海市"]}
    preds = {"a": "北京大学", "b": "上海"}
    # a: EM 0, F1 2/3; b: [上 海] vs [上 海 市]: P=1, R=2/3 -> F1 0.8
    scores = qa_scores(gold, preds, "mlqa", "zh")
    assert scores["exact_match"] == 0.0
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 0.8) / 2)
    with pytest.raises(DataError, match="unknown language code 'th'"):
        qa_scores(gold, preds, "mlqa", "th")
    with pytest.raises(DataError, match="needs the language"):
        qa_scores(gold, preds, "mlqa")


def test_accuracy_by_hand():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 50.0
    with pytest.raises(DataError, match="3 predictions for 2 labels"):
        accuracy([1, 0, 1], [1, 0])
