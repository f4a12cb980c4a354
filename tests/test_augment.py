"""Pseudo data: lexicon files, code-switching that never touches answers, lexicon induction, translate-train."""

import json
import random

import pytest
import torch

from dsxfer.data import augment
from dsxfer.data.readers import PairExample, ParallelPair, QAExample, read_squad_json
from dsxfer.data.tasks import resolve_data_dir
from dsxfer.errors import DataError

DATA = resolve_data_dir(None)

LEXICON = {"the": "die", "is": "ist", "of": "von", "in": "in", "was": "war", "and": "und", "city": "Stadt",
           "first": "erste", "what": "was", "who": "wer", "when": "wann", "year": "Jahr", "world": "Welt",
           "largest": "größte", "country": "Land", "name": "Name", "river": "Fluss", "war": "Krieg"}


def test_read_lexicon_and_line_errors(tmp_path):
    good = tmp_path / "lex.tsv"
    good.write_text("# comment\nHouse\tHaus\nhouse\tGebäude\ndog\tHund\n", encoding="utf-8")
    assert augment.read_lexicon(good) == {"house": "Haus", "dog": "Hund"}  # the first translation wins
    bad = tmp_path / "bad.tsv"
    bad.write_text("cat\tKatze\ndog Hund\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.tsv line 2: expected 'source<TAB>target', found 'dog Hund'"):
        augment.read_lexicon(bad)
    with pytest.raises(DataError, match="lexicon file not found"):
        augment.read_lexicon(tmp_path / "none.tsv")


def test_codeswitched_tydi_answers_untouched_and_found_at_new_offsets():
    examples = list(read_squad_json(DATA / "tydiqa" / "tydiqa.goldp.en.train.json", "en"))[:200]
    copies = augment.codeswitch_examples(examples, LEXICON, prob=1.0, copies=2, seed=0)
    assert len(copies) == 400
    changed = moved = 0
    for ex, cs in zip(examples * 2, copies):
        for answer, start in zip(cs.answers, cs.answer_starts):
            assert cs.context[start:start + len(answer)] == answer
        assert cs.answers == ex.answers and cs.id.startswith(ex.id + "#cs")
        changed += cs.context != ex.context
        moved += cs.answer_starts != ex.answer_starts
    assert changed > 300 and moved > 100  # most contexts change, and many answers shift position


def test_codeswitching_replaces_outside_spans_only_by_hand_example():
    ex = QAExample("q1", "The city of Paris is the largest city in the country.", "What is the largest city?",
                   ("the largest city",), (21,))
    cs = augment.codeswitch_qa(ex, LEXICON, 1.0, random.Random(0))
    assert cs.context == "Die Stadt von Paris ist the largest city in die Land."
    assert cs.answer_starts == (24,)
    assert cs.question == "Was ist die größte Stadt?"
    half = augment.codeswitch_examples([ex] * 200, LEXICON, prob=0.5, seed=1)
    replaced = sum(c.context.split()[0] == "Die" for c in half) / 200
    assert 0.35 < replaced < 0.65


def test_codeswitching_sentence_pairs_keeps_label():
    ex = PairExample("7", "The war was in the first year.", "Who was the first?", 1, "en")
    (cs,) = augment.codeswitch_examples([ex], LEXICON, prob=1.0)
    assert (cs.sentence1, cs.sentence2, cs.label) == ("Die Krieg war in die erste Jahr.", "Wer war die erste?", 1)


def test_mutual_argmax_alignment_by_hand():
    src = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    tgt = torch.tensor([[0.0, 1.0], [1.0, 0.1]])
    # src0 <-> tgt1 and src1 <-> tgt0 are mutual; src2's best (tgt0 or tgt1) prefers another source word
    assert augment.align_words(src, tgt) == [(0, 1), (1, 0)]


def test_induced_lexicon_on_identical_sides_is_the_identity():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tiny import tiny_backbone

    words = "the a cat dog sees eats big small red house".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    backbone = tiny_backbone("bert", vocab_size=len(vocab), max_position_embeddings=512)
    rng = random.Random(0)
    sentences = [" ".join(rng.sample(words, 5)) for _ in range(40)]
    pairs = [ParallelPair(str(i), s, s) for i, s in enumerate(sentences)]
    lexicon = augment.induce_lexicon(pairs, backbone, tokenizer, layer=1, min_count=2)
    assert lexicon == {w: w for w in words}


def test_translate_train_files_read_with_prefixed_ids(tmp_path):
    qa = tmp_path / "train.de.json"
    qa.write_text(json.dumps({"data": [{"title": "t", "paragraphs": [{"context": "Berlin ist groß.", "qas": [
        {"id": "a", "question": "Was ist groß?", "answers": [{"text": "Berlin", "answer_start": 0}]}]}]}]}), encoding="utf-8")
    (out,) = augment.read_translate_train([qa], "qa")
    assert (out.id, out.lang, out.answers) == ("train.de.json:a", "de", ("Berlin",))
    tsv = tmp_path / "train-de.tsv"
    tsv.write_text("Ein Satz.\tEin anderer Satz.\t0\n", encoding="utf-8")
    (pair,) = augment.read_translate_train([tsv], "classification")
    assert (pair.id, pair.label, pair.lang) == ("train-de.tsv:0", 0, "de")
    with pytest.raises(DataError, match="a qa task takes SQuAD .json or .jsonl files"):
        augment.read_translate_train([tsv], "qa")


# Frequent words of the English side of Tatoeba en-de, each with the German translations a bilingual
# reader accepts (lowercased; inflected forms included where the word inflects). Written by hand.
ACCEPTED = {
    "life": {"leben"}, "people": {"leute", "menschen"}, "time": {"zeit", "mal"}, "never": {"nie", "niemals"},
    "always": {"immer"}, "world": {"welt"}, "day": {"tag", "tage", "tages"}, "money": {"geld"},
    "idea": {"idee", "ahnung"}, "problem": {"problem"}, "today": {"heute"}, "tomorrow": {"morgen"},
    "school": {"schule"}, "children": {"kinder", "kindern"}, "friends": {"freunde", "freunden", "freundinnen"},
    "truth": {"wahrheit"}, "morning": {"morgen"}, "night": {"nacht"}, "mathematics": {"mathematik", "mathe"},
    "sleep": {"schlafen", "schlaf"}, "love": {"liebe", "lieben", "liebt", "liebst"}, "years": {"jahre", "jahren"},
    "new": {"neu", "neue", "neuen", "neuer", "neues"}, "good": {"gut", "gute", "guten", "guter", "gutes"},
    "very": {"sehr"}, "here": {"hier"}, "where": {"wo", "wohin"}, "why": {"warum", "wieso", "weshalb"},
    "two": {"zwei"}, "three": {"drei"}, "man": {"mann", "mensch"}, "face": {"gesicht"}, "everything": {"alles"},
    "nothing": {"nichts"}, "without": {"ohne"}, "because": {"weil", "denn"}, "tired": {"müde"},
    "learn": {"lernen"}, "understand": {"verstehen", "verstehe", "versteht"}, "believe": {"glauben", "glaube"},
    "speak": {"sprechen", "spreche", "sprichst"}, "eat": {"essen", "isst"}, "something": {"etwas", "was"},
    "think": {"denke", "denken", "glaube", "finde", "meinst"}, "need": {"brauche", "brauchen", "brauchst", "braucht"},
}


@pytest.mark.slow
def test_lexicon_induced_from_tatoeba_en_de_with_embedded_model():
    from dsxfer.method.backbone import load_backbone, load_tokenizer
    from dsxfer.data.tasks import tatoeba_pairs

    torch.set_num_threads(2)
    pairs = list(tatoeba_pairs("deu"))
    backbone, tokenizer = load_backbone(None, task="qa"), load_tokenizer(None)
    lexicon = augment.induce_lexicon(pairs, backbone, tokenizer, layer=8, min_count=2, batch_size=64)
    hits = {w: lexicon.get(w) for w in ACCEPTED}
    correct = sum(hits[w] in ACCEPTED[w] for w in ACCEPTED)
    precision = correct / len(ACCEPTED)  # a word missing from the lexicon counts as wrong
    print(f"\nlexicon size {len(lexicon)}; precision@1 on {len(ACCEPTED)} hand-checked words: {precision:.3f}")
    print({w: t for w, t in hits.items() if t not in ACCEPTED[w]})
    assert precision >= 0.6


def test_pseudo_training_data_follows_the_config(tmp_path):
    from dsxfer.config import load_config

    lex = tmp_path / "lex.tsv"
    lex.write_text("city\tStadt\n", encoding="utf-8")
    ex = QAExample("q1", "The city is big.", "Which city?", ("big",), (12,))
    cfg = load_config(None, [f"data.lexicon={lex}", "data.codeswitch_prob=1.0", "data.codeswitch_copies=2"])
    out = augment.pseudo_training_data(cfg, [ex])
    assert [(e.id, e.context) for e in out] == [("q1#cs0", "The Stadt is big."), ("q1#cs1", "The Stadt is big.")]
    assert augment.pseudo_training_data(load_config(None, []), [ex]) == []
    with pytest.raises(DataError, match="needs a lexicon: set data.lexicon"):
        augment.pseudo_training_data(load_config(None, ["data.codeswitch_prob=0.5"]), [ex])
