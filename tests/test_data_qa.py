"""QA featurization and post-processing: windows, labels, virtual-token room, encoder and decoder
tokenizers, and the gold-answer round trip on every XQuAD language."""

import numpy as np
import pytest

from dsxfer.data import (
    PairExample, QAExample, TASKS, collate_pairs, featurize_pairs, featurize_qa, load_task, pad_token_id,
    postprocess_qa,
)
from dsxfer.data.qa import _pair_template
from dsxfer.errors import DataError
from dsxfer.evaluation.evaluate import subset
from dsxfer.evaluation.metrics import qa_scores, squad_exact_match
from tiny import char_tokenizer, decoder_tokenizer, encoder_tokenizer, tiny_tokenizer

def gold_logits(feats):
    """Logits with their maximum exactly at the labelled span of each window (the null position for
    windows without the answer)."""
    starts, ends = [], []
    for i in range(len(feats)):
        s = np.zeros(len(feats.input_ids[i]))
        e = np.zeros(len(feats.input_ids[i]))
        s[feats.start_positions[i]] = 10.0
        e[feats.end_positions[i]] = 10.0
        starts.append(s)
        ends.append(e)
    return starts, ends


# ------------------------------------------------------------------- gold-answer round trip


@pytest.mark.parametrize("lang", TASKS["xquad"].langs)
def test_gold_predictor_scores_100_em_on_every_xquad_language(lang):
    # featurize -> logits at the gold token span -> post-process -> decoded text: EM 100 means the
    # offsets round-trip through windows, virtual-token room and whitespace trimming
    examples = subset(load_task("xquad", lang).items, 150, seed=0)  # all 1190: the slow test below
    feats = featurize_qa(examples, char_tokenizer(), max_length=384, doc_stride=128, reserved_tokens=16)
    assert max(len(ids) for ids in feats.input_ids) == 384 - 16
    assert len(feats) > len(examples)  # character tokens: contexts need several windows
    preds = postprocess_qa(examples, feats, *gold_logits(feats), max_answer_length=400)
    scores = qa_scores({ex.id: ex.answers for ex in examples}, preds)
    assert scores == {"exact_match": 100.0, "f1": 100.0}
    assert all(preds[ex.id] == ex.answers[0].strip() for ex in examples)


def _token_boundaries(tokenizer, context):
    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    starts, ends = set(), set()
    for a, b in enc["offset_mapping"]:
        while a < b and context[a].isspace():
            a += 1
        starts.add(a)
        ends.add(b)
    return starts, ends


@pytest.mark.parametrize("lang", ["en", "ar", "th"])
def test_subword_gold_predictor_misses_only_answers_that_split_a_token(lang):
    # with a real subword vocabulary an answer can start or end inside a token (Arabic clitics, "2,70"
    # cut out of "2,700"); every miss must be such a case, checked on an independent tokenization
    tok = encoder_tokenizer()
    examples = subset(load_task("xquad", lang).items, 200, seed=0)
    feats = featurize_qa(examples, tok, max_length=256, doc_stride=64)
    preds = postprocess_qa(examples, feats, *gold_logits(feats), max_answer_length=400)
    misses = [ex for ex in examples if not squad_exact_match(preds[ex.id], ex.answers[0])]
    assert len(misses) <= 0.05 * len(examples)
    for ex in misses:
        starts, ends = _token_boundaries(tok, ex.context)
        a, b = ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0])
        assert a not in starts or b not in ends, (ex.id, preds[ex.id], ex.answers[0])


# ------------------------------------------------------------------------------------ windows


def _long_example():
    filler = " ".join(f"word{i}" for i in range(300))
    context = f"{filler} The treaty was signed in Maastricht in 1992. {filler}"
    start = context.index("Maastricht")
    return QAExample("long", context, "Where was the treaty signed?", ("Maastricht",), (start,), "en")


def test_windows_overlap_by_doc_stride_and_label_only_windows_holding_the_answer():
    tok = encoder_tokenizer()
    ex = _long_example()
    feats = featurize_qa([ex], tok, max_length=96, doc_stride=32, reserved_tokens=8)
    assert len(feats) > 3 and set(feats.example_id) == {"long"}
    assert all(len(ids) <= 96 - 8 for ids in feats.input_ids)
    windows = [[o for o in offs if o is not None] for offs in feats.offset_mapping]
    for prev, nxt in zip(windows, windows[1:]):
        assert sum(o in set(prev) for o in nxt) == 32  # consecutive windows share doc_stride tokens
    answer_end = ex.answer_starts[0] + len(ex.answers[0])
    for i, offs in enumerate(feats.offset_mapping):
        ctx = [o for o in offs if o is not None]
        holds = ctx[0][0] <= ex.answer_starts[0] and ctx[-1][1] >= answer_end
        s, e = feats.start_positions[i], feats.end_positions[i]
        if holds:
            assert ex.context[offs[s][0]:offs[e][1]] == "Maastricht"
        else:
            assert (s, e) == (0, 0) and feats.input_ids[i][0] == tok.cls_token_id  # null = CLS
    assert any(feats.start_positions)


@pytest.mark.parametrize("bos", [True, False])
def test_decoder_tokenizers_without_cls_use_position_zero_as_null(bos):
    tok = decoder_tokenizer(bos)
    assert tok.cls_token_id is None and tok.pad_token_id is None
    assert pad_token_id(tok) == tok.eos_token_id  # decoders without a pad token pad with EOS
    ex = _long_example()
    feats = featurize_qa([ex], tok, max_length=96, doc_stride=32)
    assert set(feats.null_index) == {0}
    first = feats.input_ids[0][0]
    assert (first == tok.bos_token_id) if bos else (feats.offset_mapping[0][0] is None)  # a question token
    labelled = [i for i in range(len(feats)) if feats.start_positions[i] != 0]
    assert labelled
    for i in labelled:
        offs = feats.offset_mapping[i]
        assert ex.context[offs[feats.start_positions[i]][0]:offs[feats.end_positions[i]][1]] == "Maastricht"
    batch = feats.batch([0, len(feats) - 1], pad_token_id(tok), with_labels=True)
    assert batch["input_ids"].shape[0] == 2 and "token_type_ids" not in batch
    assert (batch["input_ids"][1][batch["attention_mask"][1] == 0] == tok.eos_token_id).all()


@pytest.mark.parametrize("arch", ["xlm-roberta", "bert", "llama", "qwen2"])
def test_project_tiny_tokenizers_of_every_architecture(arch):
    # the tokenizers the other tests of the project use: SentencePiece (XLM-R, Llama), WordPiece with
    # token types (BERT) and byte-level BPE without any special token (Qwen2)
    tok = tiny_tokenizer(arch)
    ex = _long_example()
    feats = featurize_qa([ex], tok, max_length=80, doc_stride=24, reserved_tokens=6)
    assert all(len(ids) <= 74 for ids in feats.input_ids)
    expected_null = 0 if tok.cls_token_id is None else feats.input_ids[0].index(tok.cls_token_id)
    assert set(feats.null_index) == {expected_null} == {0}
    holding = [i for i in range(len(feats)) if feats.start_positions[i] != feats.null_index[i]]
    assert holding
    for i in holding:
        offs = feats.offset_mapping[i]
        assert ex.context[offs[feats.start_positions[i]][0]:offs[feats.end_positions[i]][1]] == "Maastricht"
    preds = postprocess_qa([ex], feats, *gold_logits(feats))
    assert preds == {"long": "Maastricht"}
    batch = feats.batch(list(range(len(feats))), pad_token_id(tok), with_labels=True)
    if arch == "bert":  # token types: 0 for the question, 1 for the context
        types = batch["token_type_ids"][holding[0]]
        offs = feats.offset_mapping[holding[0]]
        assert all(int(types[j]) == 1 for j, o in enumerate(offs) if o is not None)
        assert int(types[1]) == 0
    else:
        assert "token_type_ids" not in batch


@pytest.mark.parametrize("arch", ["xlm-roberta", "bert", "llama", "qwen2", "encoder", "decoder-no-bos"])
def test_windows_assembled_from_parts_equal_the_tokenizers_pair_call(arch):
    # the fast path tokenizes each context once; it must give exactly the features of the tokenizer's
    # own pair call with overflowing windows (ids, token types, offsets, labels, null positions)
    tok = {"encoder": encoder_tokenizer, "decoder-no-bos": lambda: decoder_tokenizer(bos=False)}.get(arch, lambda: tiny_tokenizer(arch))()
    examples = [ex for lang in ("en", "de", "zh") for ex in load_task("xquad", lang).items[:12]]
    kwargs = dict(max_length=160, doc_stride=40, reserved_tokens=8, max_question_tokens=100)
    assert _pair_template(tok) is not None  # the fast path is really taken
    fast = featurize_qa(examples, tok, **kwargs)
    reference = featurize_qa(examples, tok, use_pair_calls=True, **kwargs)
    assert len(fast) == len(reference) > len(examples)
    for field in ("input_ids", "attention_mask", "token_type_ids", "example_index", "example_id", "offset_mapping",
                  "null_index", "start_positions", "end_positions"):
        assert getattr(fast, field) == getattr(reference, field), field


def test_long_question_is_cut_and_too_small_budget_is_a_clear_error():
    tok = encoder_tokenizer()
    ex = QAExample("q", "Rome is the capital of Italy.", "why " * 200, ("Rome",), (0,), "en")
    feats = featurize_qa([ex], tok, max_length=128, doc_stride=16, max_question_tokens=32)
    question_tokens = sum(o is None for o in feats.offset_mapping[0]) - tok.num_special_tokens_to_add(pair=True)
    assert question_tokens == 32
    with pytest.raises(DataError, match="max_length=128 - reserved_tokens=64 leaves 64 tokens, which must exceed the longest question \\(32 tokens"):
        featurize_qa([ex], tok, max_length=128, doc_stride=30, reserved_tokens=64, max_question_tokens=32)


def test_unlabelled_question_points_to_null():
    tok = encoder_tokenizer()
    ex = QAExample("u", "Rome is the capital of Italy.", "What?", (), (), "en")
    feats = featurize_qa([ex], tok, max_length=64, doc_stride=16)
    assert feats.start_positions == [0] and feats.end_positions == [0]


# ----------------------------------------------------------------------------- post-processing


def _toy_features():
    # one example "ab cd ef gh", two windows; question/special tokens carry None offsets
    ex = QAExample("t", "ab cd ef gh", "q?", ("cd",), (3,), "en")
    feats = featurize_qa([ex], char_tokenizer(), max_length=384, doc_stride=8, with_labels=False)
    return ex, feats


def test_postprocess_picks_best_valid_span_and_respects_limits():
    ex, feats = _toy_features()
    offs = feats.offset_mapping[0]
    pos = {ex.context[o[0]]: i for i, o in enumerate(offs) if o is not None}  # char -> token index
    n = len(offs)
    sl, el = np.zeros(n), np.zeros(n)
    sl[0] = el[0] = 100.0  # the CLS/null position is never an answer
    sl[pos["e"]], el[pos["b"]] = 9.0, 8.0  # e..b ends before it starts: invalid (would score 17)
    sl[pos["c"]], el[pos["d"]] = 5.0, 5.0  # c..d = 10 beats a..b = 0 + 8
    assert postprocess_qa([ex], feats, [sl], [el])["t"] == "cd"
    # max_answer_length=1 rules out "cd" (2 tokens); the best 1-token span is then e..e (9 + 0)
    assert postprocess_qa([ex], feats, [sl], [el], max_answer_length=1)["t"] == "e"
    # n_best=1 keeps only the top start (the null position) and top end: no valid span -> ""
    assert postprocess_qa([ex], feats, [sl], [el], n_best=1)["t"] == ""
    with pytest.raises(DataError, match="1 start / 0 end logit rows for 1 features"):
        postprocess_qa([ex], feats, [sl], [])


def test_postprocess_takes_the_best_window():
    tok = encoder_tokenizer()
    ex = _long_example()
    feats = featurize_qa([ex], tok, max_length=96, doc_stride=32)
    starts, ends = [], []
    for i, offs in enumerate(feats.offset_mapping):
        ctx = [j for j, o in enumerate(offs) if o is not None]
        s, e = np.zeros(len(offs)), np.zeros(len(offs))
        s[ctx[0]] = e[ctx[0]] = 1.0 + i  # a weak first-token answer per window, growing with i
        starts.append(s)
        ends.append(e)
    last = feats.offset_mapping[-1]
    first_ctx = next(o for o in last if o is not None)
    assert postprocess_qa([ex], feats, starts, ends)["long"] == ex.context[first_ctx[0]:first_ctx[1]]


# --------------------------------------------------------------------------- sentence pairs


def test_pair_featurization_leaves_room_for_virtual_tokens():
    tok = encoder_tokenizer()
    pairs = [PairExample("0", "a " * 100, "b " * 100, 1, "en"), PairExample("1", "short one", "short two", 0, "en")]
    feats = featurize_pairs(pairs, tok, max_length=64, reserved_tokens=16)
    assert [len(x) for x in feats["input_ids"]][0] == 48 and len(feats["input_ids"][1]) < 48
    assert feats["labels"] == [1, 0] and feats["example_id"] == ["0", "1"]
    batch = collate_pairs(feats, [0, 1], pad_token_id(tok))
    assert batch["input_ids"].shape == (2, 48) and batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"][1].sum() == len(feats["input_ids"][1])


@pytest.mark.slow
def test_gold_predictor_full_xquad_all_languages():
    tok = char_tokenizer()
    for lang in TASKS["xquad"].langs:
        examples = load_task("xquad", lang).items
        # a stride of 256 characters keeps even the longest answers whole inside some window
        feats = featurize_qa(examples, tok, max_length=512, doc_stride=256)
        preds = postprocess_qa(examples, feats, *gold_logits(feats), max_answer_length=1000)
        assert qa_scores({ex.id: ex.answers for ex in examples}, preds) == {"exact_match": 100.0, "f1": 100.0}, lang
