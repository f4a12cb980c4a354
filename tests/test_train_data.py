"""build_train_data on the bundled files: the source pool, k shots, pseudo data and parallel pairs reach training."""

from __future__ import annotations

import torch

from dsxfer.config import config_from_dict
from dsxfer.method.model import TransferModel
from dsxfer.data.build import build_train_data
from tiny import tiny_backbone_and_tokenizer


def _build(tmp_path, **data):
    cfg = config_from_dict({
        "model": {"max_length": 96, "doc_stride": 32},
        "prompts": {"length": 2, "init": "random"},
        "injection": {"length": 2, "reparam": False},
        "alignment": {"enabled": True, "target_langs": ["deu"], "max_pairs": 12, "batch_size": 4, "max_length": 16},
        "data": {"max_train_examples": 30, "dev_examples": 5, "k_shot": 2, "target_langs": ["de"], **data},
        "eval": {"tasks": ["xquad"], "langs": ["en"]},
        "train": {"output_dir": str(tmp_path), "seed": 5},
    })
    backbone, tokenizer = tiny_backbone_and_tokenizer("xlm-roberta")
    model = TransferModel(backbone, cfg, tokenizer)
    return build_train_data(cfg, model, tokenizer)


def test_pool_shots_and_pairs_reach_the_batches(tmp_path):
    data, used = _build(tmp_path)
    assert used["pseudo_examples"] == 0
    assert len(used["shots"]["de"]) == 2 and used["parallel_pairs"] == 12 and data.align.n == 12
    batch = data.task.make(list(range(4)))
    # every feature holds at most max_length - soft-prompt tokens real tokens
    assert batch["input_ids"].shape[1] <= 96 - 2
    assert set(batch) >= {"input_ids", "attention_mask", "start_positions", "end_positions"}
    align = data.align.make([0, 1, 2])
    assert align["align_pair_ids"].unique().numel() == 3


def test_codeswitched_copies_are_trained_on(tmp_path):
    lexicon = tmp_path / "lexicon.tsv"
    lexicon.write_text("the\tder\nof\tvon\nin\tim\nand\tund\nis\tist\n", encoding="utf-8")
    plain, used_plain = _build(tmp_path / "a")
    mixed, used_mixed = _build(tmp_path / "b", lexicon=str(lexicon), codeswitch_prob=1.0, codeswitch_copies=1)
    # one code-switched copy of every source example, featurized like the originals
    assert used_mixed["pseudo_examples"] == used_plain["source_examples"]
    assert mixed.task.n > plain.task.n
    _, tokenizer = tiny_backbone_and_tokenizer("xlm-roberta")
    extra = mixed.task.make(list(range(plain.task.n, mixed.task.n)))
    text = " ".join(tokenizer.batch_decode(extra["input_ids"], skip_special_tokens=True))
    english = " ".join(tokenizer.batch_decode(plain.task.make(list(range(min(len(extra["input_ids"]), plain.task.n))))["input_ids"],
                                              skip_special_tokens=True))
    # the English source features read "the ... of", their code-switched copies "der ... von"
    assert text.count(" der ") > 10 * max(english.count(" der "), 1)
    assert text.count(" the ") < english.count(" the ") / 10
    starts, ends = extra["start_positions"], extra["end_positions"]
    assert bool(((starts <= ends) & (starts >= 0)).all())
    assert torch.equal(plain.task.make([0])["input_ids"], mixed.task.make([0])["input_ids"])


def test_a_task_both_trained_and_evaluated_is_split_by_row(tmp_path):
    cfg = config_from_dict({
        "model": {"task": "classification", "max_length": 64, "doc_stride": 16},
        "prompts": {"length": 0}, "injection": {"length": 2, "reparam": False},
        "alignment": {"enabled": False},
        "data": {"train_task": "pawsx", "shot_task": "pawsx", "max_train_examples": 40, "dev_examples": 5,
                 "k_shot": 4, "target_langs": ["de"]},
        "eval": {"tasks": ["pawsx"], "langs": ["en", "de"]},
        "train": {"output_dir": str(tmp_path), "seed": 5},
    })
    backbone, tokenizer = tiny_backbone_and_tokenizer("xlm-roberta")
    data, used = build_train_data(cfg, TransferModel(backbone, cfg, tokenizer), tokenizer)
    held_out = set(used["test_rows"]["ids"])
    assert used["test_rows"]["tasks"] == ["pawsx"] and len(held_out) == 1000  # half of the 2000 rows
    assert not held_out & set(used["shots"]["de"]) and not held_out & set(used["source_dev_ids"])
    # train.log says why the pool and the dev set are smaller than data.max_train_examples / data.dev_examples
    (split_note,) = [n for n in data.notes if n.startswith("row split:")]
    assert split_note.startswith("row split: pawsx is both trained on and evaluated, so 1000 of its 2000 row ids are held out")
    assert f"that leaves {used['source_examples']} of the 40 source training questions and {used['source_dev_examples']} of the 5 " in split_note
    assert used["source_examples"] < 40
