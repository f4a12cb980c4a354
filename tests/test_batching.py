"""Length-grouped training order (DataOrder's contract) and length-sorted evaluation batches."""

import random

import pytest
import torch

from dsxfer.data import load_task
from dsxfer.data.length_order import LengthGroupedOrder
from dsxfer.evaluation.evaluate import build_hf_model, evaluate_classification, evaluate_qa, hf_predictor, subset
from dsxfer.data.sampling import DataOrder
from tiny import encoder_tokenizer, save_tiny_folder, subword_backbone

_rng = random.Random(7)
LENGTHS = [_rng.randint(20, 256) for _ in range(203)]  # 203: batches straddle epoch ends


def stream(orders, steps: int, per_rank: int = 4) -> list[list[list[int]]]:
    """Each rank holds its own order object (as each rank process does) and takes its slice per step."""
    return [[o.next(per_rank, r, len(orders)) for r, o in enumerate(orders)] for _ in range(steps)]


def ranks(pos: int = 0, world: int = 2):
    return [LengthGroupedOrder(LENGTHS, seed=5, pos=pos, global_batch=4 * world) for _ in range(world)]


def test_resuming_mid_epoch_gives_the_same_subsequent_batches():
    full = stream(ranks(), 80)  # 80 x 8 items: more than 3 epochs
    first = ranks()
    stream(first, 31)  # stop in the middle of the second epoch; the saved state is the position alone
    assert first[0].pos == 31 * 8
    assert stream(ranks(pos=first[0].pos), 49) == full[31:]


def test_every_epoch_is_a_permutation_and_batches_pad_less_than_random_order():
    order = LengthGroupedOrder(LENGTHS, seed=5, global_batch=8)
    for epoch in range(3):
        assert sorted(order.epoch_order(epoch)) == list(range(len(LENGTHS)))
    assert order.epoch_order(0) != order.epoch_order(1)
    assert order.epoch_order(0) != LengthGroupedOrder(LENGTHS, seed=6, global_batch=8).epoch_order(0)

    def padded_tokens(o) -> int:
        total = 0
        for batch in stream([o], 25, per_rank=8):
            widths = [LENGTHS[i] for i in batch[0]]
            total += max(widths) * len(widths)
        return total

    real = sum(LENGTHS[i] for i in DataOrder(len(LENGTHS), 5).next(200, 0, 1))
    grouped, plain = padded_tokens(LengthGroupedOrder(LENGTHS, seed=5, global_batch=8)), padded_tokens(DataOrder(len(LENGTHS), 5))
    assert grouped < 0.75 * plain, (grouped, plain, real)


def test_training_uses_the_length_grouped_order_when_lengths_are_known(tmp_path):
    from dsxfer.data.build import Batches, TrainData
    from dsxfer.training.train import run_training
    from tiny import qa_data, tiny_cfg, tiny_model

    seen = []
    base = qa_data(n=16)

    def make(idx):
        seen.append(list(idx))
        return base.make(idx)

    lengths = [int(base.make([i])["attention_mask"].sum()) for i in range(16)]
    cfg = tiny_cfg(tmp_path, train={"max_steps": 2, "micro_batch_size": 4})
    run_training(cfg, tiny_model(cfg), TrainData(task=Batches(16, make, lengths)), quiet=True)
    expected = LengthGroupedOrder(lengths, 3, global_batch=4)
    assert seen[:2] == [expected.next(4, 0, 1), expected.next(4, 0, 1)]


def test_length_sorted_evaluation_gives_the_same_predictions_and_scores(tmp_path):
    path = save_tiny_folder(tmp_path / "xlmr", *subword_backbone("xlm-roberta"))
    model = build_hf_model(str(path), seed=0)
    from dsxfer.method.backbone import load_tokenizer

    tok = load_tokenizer(str(path))
    predict = hf_predictor(model)
    widths = {True: [], False: []}

    examples = subset(load_task("mlqa", "de").items, 12, seed=0)
    results = {}
    for sort in (True, False):
        def recording(batch, sort=sort):
            widths[sort].append(batch["input_ids"].shape[1] * batch["input_ids"].shape[0])
            return predict(batch)
        results[sort] = evaluate_qa(recording, tok, examples, lang="de", max_length=96, doc_stride=32, batch_size=4,
                                    progress=False, length_sorted=sort)
    assert results[True] == results[False]
    assert sum(widths[True]) < sum(widths[False])  # fewer padded positions computed

    pairs = load_task("pawsx", "es").items[:30]
    by_length = lambda b: torch.stack([torch.zeros(len(b["input_ids"])), (b["attention_mask"].sum(1) > 40).float()], 1)
    assert (evaluate_classification(by_length, encoder_tokenizer(), pairs, lang="es", batch_size=8, progress=False)
            == evaluate_classification(by_length, encoder_tokenizer(), pairs, lang="es", batch_size=8, progress=False,
                                       length_sorted=False))
