"""Readers: every bundled file loads with the counts of the data README; bad inputs fail clearly."""

import json

import pytest

from dsxfer.data import (
    TASKS, as_dataset, load_task, parse_langs, read_jsonl, read_parallel, read_pawsx_tsv, read_squad_json,
    resolve_data_dir, tatoeba_pairs,
)
from dsxfer.errors import DataError

DATA = resolve_data_dir()

# ------------------------------------------------------------------------------ bundled counts


@pytest.mark.parametrize("lang", TASKS["xquad"].langs)
def test_xquad_counts(lang):
    recs = load_task("xquad", lang)
    assert len(recs) == 1190 and not recs.skipped
    assert len({r.context for r in recs}) == 240  # the data README's paragraph count
    assert all(r.lang == lang and r.answers for r in recs)


def test_mlqa_all_49_pairs_load_and_same_language_counts():
    expected = {"en": 1148, "de": 512, "es": 500, "ar": 517, "hi": 507, "vi": 511, "zh": 504}
    langs = TASKS["mlqa"].langs
    sizes = {}
    for ctx in langs:
        for q in langs:
            recs = load_task("mlqa", f"{ctx}-{q}")
            assert not recs.skipped
            sizes[(ctx, q)] = len(recs)
    assert len(sizes) == 49
    assert {lang: sizes[(lang, lang)] for lang in langs} == expected
    cross = [n for (c, q), n in sizes.items() if c != q]
    assert min(cross) == 161 and max(cross) == 517
    # "de" is shorthand for the same-language file
    assert len(load_task("mlqa", "de")) == 512


def test_mlqa_cross_language_file_has_context_and_question_languages():
    recs = load_task("mlqa", "de-en")
    # the German context holds the answer; the question is English; ids are shared with the de-de file
    assert recs[0].lang == "en"
    assert {r.id for r in recs} <= {r.id for r in load_task("mlqa", "de")} | {r.id for r in load_task("mlqa", "en")}


@pytest.mark.parametrize("lang", TASKS["pawsx"].langs)
def test_pawsx_counts(lang):
    recs = load_task("pawsx", lang)
    assert len(recs) == 2000 and not recs.skipped
    assert [r.id for r in recs[:3]] == ["0", "1", "2"]  # row identity = row index, same in every language
    assert {r.label for r in recs} == {0, 1}


def test_tydiqa_counts_and_unlabelled_dev():
    train = {"en": 3696, "ko": 1625, "sw": 2755}
    dev = {"ar": 921, "bn": 113, "en": 440, "fi": 782, "id": 565, "ko": 276, "ru": 812, "sw": 499, "te": 669}
    train_recs = {lang: load_task("tydiqa", lang, "train") for lang in train}
    assert {lang: len(r) for lang, r in train_recs.items()} == train
    # XTREME numbers TyDi train questions per article, so ids repeat: they are made unique, and said so
    en = train_recs["en"]
    assert len({r.id for r in en}) == 3696 and "renamed to '<id>@<article>.<paragraph>'" in en.notes[0]
    dev_recs = {lang: load_task("tydiqa", lang, "dev") for lang in dev}
    assert {lang: len(r) for lang, r in dev_recs.items()} == dev
    # XTREME ships TyDi dev without gold answers; read, but marked unlabelled (no answers)
    assert all(not r.answers for recs in dev_recs.values() for r in recs)
    with pytest.raises(DataError, match="train data only for en, ko, sw"):
        load_task("tydiqa", "fi", "train")


@pytest.mark.parametrize("lang", ["deu", "fra", "cmn", "ara"])
def test_tatoeba_counts(lang):
    # a pair per line as `wc -l` counts lines
    pairs = tatoeba_pairs(lang)
    assert len(pairs) == 1000 and not pairs.skipped
    assert pairs[0].id == f"tatoeba-{lang}:0" and pairs[0].lang == lang
    assert pairs[0].src == (DATA / "tatoeba" / f"tatoeba.{lang}-eng.eng").read_text(encoding="utf-8").splitlines()[0].strip()


def test_every_tatoeba_language_loads():
    langs = sorted(p.name.split(".")[1].split("-")[0] for p in (DATA / "tatoeba").glob("tatoeba.*-eng.eng"))
    sizes = {lang: len(tatoeba_pairs(lang)) for lang in langs}
    assert len(sizes) == 112
    assert sum(n == 1000 for n in sizes.values()) == 72 and max(sizes.values()) == 1000 and min(sizes.values()) > 0


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("DSXFER_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir(DATA) == DATA  # the config value wins over the environment
    monkeypatch.setenv("DSXFER_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"from \$DSXFER_DATA\) does not exist"):
        resolve_data_dir()


def test_records_become_a_datasets_table():
    ds = as_dataset(load_task("pawsx", "de").items[:10])
    assert ds.num_rows == 10 and set(ds.column_names) == {"id", "sentence1", "sentence2", "label", "lang"}


# ------------------------------------------------------------------------------ bad-input catalogue


def squad_doc(context="Paris is in France.", answer="France", start=12, **q_extra):
    q = {"id": "q1", "question": "Where?", "answers": [{"text": answer, "answer_start": start}], **q_extra}
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [q]}]}]}


def write_json(path, doc):
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def test_valid_squad_record_reads(tmp_path):
    recs = read_squad_json(write_json(tmp_path / "ok.json", squad_doc()), "en")
    assert recs[0].answers == ("France",) and recs[0].answer_starts == (12,)


def test_truncated_json(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(squad_doc())[:50], encoding="utf-8")
    with pytest.raises(DataError, match=r"cut.json: line 1 column \d+: not valid JSON .*truncated or corrupt"):
        read_squad_json(path)


def test_missing_keys(tmp_path):
    doc = squad_doc()
    del doc["data"][0]["paragraphs"][0]["qas"][0]["question"]
    with pytest.raises(DataError, match=r"data\[0\].paragraphs\[0\].qas\[0\]: missing key 'question'"):
        read_squad_json(write_json(tmp_path / "m.json", doc))
    with pytest.raises(DataError, match="top level must be an object with a 'data' list"):
        read_squad_json(write_json(tmp_path / "n.json", {"version": "1.1"}))


def test_answer_not_at_answer_start(tmp_path):
    path = write_json(tmp_path / "a.json", squad_doc(start=3))
    with pytest.raises(DataError, match=r"a.json: data\[0\].paragraphs\[0\].qas\[0\] \(id q1\) answers\[0\]: "
                                        r"field 'text' 'France' is not in the context at answer_start=3"):
        read_squad_json(path)


def test_label_out_of_set(tmp_path):
    path = tmp_path / "dev-de.tsv"
    path.write_text("a b\tc d\t1\ne f\tg h\t2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dev-de.tsv: line 2: field 'label' is '2', not in the label set \[0, 1\]"):
        read_pawsx_tsv(path)


def test_pawsx_header_format(tmp_path):
    path = tmp_path / "h.tsv"
    path.write_text("id\tsentence1\tsentence2\tlabel\n17\ta b\tc d\t0\n18\te f\tg h\t1\n", encoding="utf-8")
    recs = read_pawsx_tsv(path, "en")
    assert [(r.id, r.label) for r in recs] == [("17", 0), ("18", 1)]


def test_unequal_parallel_files(tmp_path):
    (tmp_path / "s.txt").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text("eins\nzwei\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"s.txt has 3 lines but .*t.txt has 2: parallel files must be line-aligned"):
        read_parallel(tmp_path / "s.txt", tmp_path / "t.txt")


def test_unknown_language_codes():
    with pytest.raises(DataError, match="unknown language code 'xx' for task xquad: choose from ar, de"):
        parse_langs("xquad", "de,xx")
    with pytest.raises(DataError, match="unknown language code 'fr' for task mlqa"):
        load_task("mlqa", "de-fr")
    with pytest.raises(DataError, match="unknown language code 'zzz' for Tatoeba"):
        tatoeba_pairs("zzz")
    with pytest.raises(DataError, match="unknown task 'squad'"):
        load_task("squad", "en")


def test_empty_file(tmp_path):
    for name in ("e.json", "e.tsv", "e.jsonl"):
        (tmp_path / name).write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="e.json: the file is empty"):
        read_squad_json(tmp_path / "e.json")
    with pytest.raises(DataError, match="e.tsv: the file is empty"):
        read_pawsx_tsv(tmp_path / "e.tsv")
    with pytest.raises(DataError, match="e.jsonl: the file is empty"):
        read_jsonl(tmp_path / "e.jsonl", "qa")


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("a b\tc d\t1\nStraße\tx\t0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.tsv: line 2 \(byte 14\): bytes b'\\xdf' are not UTF-8; re-save the file as UTF-8"):
        read_pawsx_tsv(path)


def test_missing_file():
    with pytest.raises(DataError, match="nope.json: file not found"):
        read_squad_json("nope.json")


# ------------------------------------------------------------------------------ on_error=skip


def test_skip_reports_counts_and_reasons(tmp_path):
    doc = squad_doc()
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    qas.append({"id": "q2", "question": "Bad?", "answers": [{"text": "Spain", "answer_start": 0}]})
    qas.append({"id": "q3", "answers": []})
    qas.append({"id": "q4", "question": "Also bad?", "answers": [{"text": "Germany", "answer_start": 5}]})
    recs = read_squad_json(write_json(tmp_path / "mixed.json", doc), on_error="skip")
    assert [r.id for r in recs] == ["q1"]
    assert len(recs.skipped) == 3
    assert [s.where.split(" ")[0] for s in recs.skipped] == [
        "data[0].paragraphs[0].qas[1]", "data[0].paragraphs[0].qas[2]", "data[0].paragraphs[0].qas[3]"]
    summary = recs.skip_summary()
    assert summary["missing key 'question'"] == 1
    assert sum(summary.values()) == 3
    assert all(s.file.endswith("mixed.json") for s in recs.skipped)


def test_skip_in_tsv_and_jsonl(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text("a\tb\t1\nonly two\tfields\nc\td\t7\ne\tf\t0\n", encoding="utf-8")
    recs = read_pawsx_tsv(tsv, on_error="skip")
    assert [r.id for r in recs] == ["0", "3"]  # row ids stay the line's row index, skipped rows included
    assert [s.where for s in recs.skipped] == ["line 2", "line 3"]

    jl = tmp_path / "own.jsonl"
    jl.write_text('{"id": 1, "sentence1": "a", "sentence2": "b", "label": 1}\n{"id": 2, "sentence1": "a"}\n{not json\n',
                  encoding="utf-8")
    recs = read_jsonl(jl, "classification", on_error="skip", labels=(0, 1))
    assert [r.id for r in recs] == ["1"]
    assert [s.reason for s in recs.skipped] == ["missing key 'sentence2'", "not valid JSON (Expecting property name enclosed in double quotes)"]
    with pytest.raises(DataError, match="own.jsonl: line 2: missing key 'sentence2'"):
        read_jsonl(jl, "classification")


def test_jsonl_qa_records(tmp_path):
    jl = tmp_path / "qa.jsonl"
    rows = [{"id": "a", "context": "Tom lives in Rome.", "question": "Where?", "answers": [{"text": "Rome", "answer_start": 13}]},
            {"id": "b", "context": "x", "question": "y", "answers": [{"text": "z", "answer_start": 0}]}]
    jl.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"qa.jsonl: line 2 \(id b\) answers\[0\]: field 'text' 'z' is not in the context"):
        read_jsonl(jl, "qa")
    recs = read_jsonl(jl, "qa", on_error="skip")
    assert [r.answers for r in recs] == [("Rome",)] and len(recs.skipped) == 1
