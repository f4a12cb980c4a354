"""k-shot sampling: seeded, reproducible, class-balanced, per language; ids saved with the run."""

import collections

import pytest

from dsxfer.data import load_shots, load_task, sample_k_shot, save_shots
from dsxfer.errors import DataError


@pytest.fixture(scope="module")
def pawsx_de():
    return load_task("pawsx", "de").items


def test_same_seed_same_shots_other_seed_other_shots(pawsx_de):
    a = sample_k_shot(pawsx_de, 16, seed=3, lang="de")
    assert [r.id for r in a] == [r.id for r in sample_k_shot(list(reversed(pawsx_de)), 16, seed=3, lang="de")]
    assert {r.id for r in a} != {r.id for r in sample_k_shot(pawsx_de, 16, seed=4, lang="de")}
    # languages draw independently from parallel pools
    assert {r.id for r in a} != {r.id for r in sample_k_shot(pawsx_de, 16, seed=3, lang="es")}
    assert len({r.id for r in a}) == 16


@pytest.mark.parametrize("k", [2, 7, 32])
def test_class_balanced(pawsx_de, k):
    shots = sample_k_shot(pawsx_de, k, seed=0, balanced=True, lang="de")
    counts = collections.Counter(r.label for r in shots)
    assert sum(counts.values()) == k and set(counts) == {0, 1}
    assert abs(counts[0] - counts[1]) <= 1


def test_balanced_draw_is_balanced_even_on_a_skewed_pool(pawsx_de):
    skewed = [r for r in pawsx_de if r.label == 1][:200] + [r for r in pawsx_de if r.label == 0][:10]
    counts = collections.Counter(r.label for r in sample_k_shot(skewed, 20, seed=1, balanced=True))
    assert counts == {0: 10, 1: 10}
    with pytest.raises(DataError, match="needs 11 examples of label 0, the pool has 10"):
        sample_k_shot(skewed, 22, seed=1, balanced=True)


def test_k_larger_than_pool_and_exclusions(pawsx_de):
    pool = pawsx_de[:5]
    assert len(sample_k_shot(pool, 5, seed=0, lang="de")) == 5  # k equal to the pool takes all of it
    with pytest.raises(DataError, match="k=6 is larger than the pool of 5 examples for language 'de'"):
        sample_k_shot(pool, 6, seed=0, lang="de")
    shots = sample_k_shot(pool, 3, seed=0, exclude=["0", "1"])
    assert {r.id for r in shots} == {"2", "3", "4"}


def test_shots_file_round_trip(tmp_path, pawsx_de):
    shots = {"de": sample_k_shot(pawsx_de, 4, seed=0, lang="de"), "es": ["10", "11"]}
    path = save_shots(tmp_path / "run" / "shots.json", shots, task="pawsx", k=4, seed=0)
    doc = load_shots(path)
    assert doc["task"] == "pawsx" and doc["k"] == 4 and doc["seed"] == 0
    assert doc["ids"] == {"de": [r.id for r in shots["de"]], "es": ["10", "11"]}
    path.write_text('{"task": "pawsx", "k": 4}', encoding="utf-8")
    with pytest.raises(DataError, match="field 'seed' is missing"):
        load_shots(path)
    with pytest.raises(DataError, match="shots file not found"):
        load_shots(tmp_path / "none.json")
