"""Leakage: splits by row identity across languages, and the overlap check that rejects leaky splits."""

import ast
import os
import subprocess
import sys

import pytest

from dsxfer.data import check_no_overlap, load_task, split_rows
from dsxfer.errors import DataError


def select(records, ids):
    """The records whose row id is in ids, in file order (how training and evaluation pick rows by id)."""
    keep = set(ids)
    return [r for r in records if r.id in keep]


def test_pawsx_split_holds_out_the_same_rows_in_every_language():
    ids = [r.id for r in load_task("pawsx", "en")]
    train_ids, test_ids = split_rows(ids, test_fraction=0.25, seed=0)
    assert len(test_ids) == 500 and len(train_ids) == 1500 and not set(train_ids) & set(test_ids)
    for lang in ("de", "zh"):
        recs = load_task("pawsx", lang).items
        train, test = select(recs, train_ids), select(recs, test_ids)
        check_no_overlap(train, test)  # passes: no row is on both sides in any language
        assert len(train) + len(test) == 2000
    # the same row index in another language IS the same row: training on German row i and testing
    # English row i is a leak
    de_train = select(load_task("pawsx", "de").items, train_ids)
    en_test = select(load_task("pawsx", "en").items, test_ids)
    check_no_overlap(de_train, en_test)
    leaky_en_test = load_task("pawsx", "en").items[:100]
    with pytest.raises(DataError, match=r"(\d+) row id\(s\) are in both the training pool and the test set \(e.g. "):
        check_no_overlap(de_train, leaky_en_test)


def test_xquad_training_on_a_translation_of_a_test_question_is_rejected():
    # a "split by language" (train German XQuAD, test English XQuAD) is the classic leak
    de = load_task("xquad", "de").items
    en = load_task("xquad", "en").items
    with pytest.raises(DataError, match=r"1190 row id\(s\) are in both .*e.g. 56") as err:
        check_no_overlap(de, en, "xquad de train vs xquad en test")
    assert str(err.value).startswith("xquad de train vs xquad en test: 1190 row id(s)")
    # split by question id instead: held-out questions are held out in every language
    train_ids, test_ids = split_rows([r.id for r in en], test_fraction=0.5, seed=1)
    check_no_overlap(select(de, train_ids), select(en, test_ids))


def test_split_is_seeded_and_validates_fraction():
    ids = [str(i) for i in range(100)]
    train, test = split_rows(ids, 0.3, seed=5)
    # the expectation comes from a fresh interpreter with another hash seed: a split saved with one run is
    # the split any later process computes (nothing depends on set order or on state of this process)
    fresh = subprocess.run([sys.executable, "-c", "from dsxfer.data import split_rows; "
                            "print(repr(split_rows([str(i) for i in range(100)], 0.3, seed=5)))"],
                           capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert (train, test) == ast.literal_eval(fresh.stdout)
    # and it depends on which ids there are, not on their order; the sides keep the input order
    reversed_train, reversed_test = split_rows(ids[::-1], 0.3, seed=5)
    assert set(reversed_test) == set(test) and reversed_test == test[::-1]
    assert len(test) == 30 and sorted(train + test, key=int) == ids and train == sorted(train, key=int)
    assert split_rows(ids, 0.3, seed=5)[1] != split_rows(ids, 0.3, seed=6)[1]
    with pytest.raises(DataError, match="test_fraction must be between 0 and 1"):
        split_rows(ids, 1.0)
