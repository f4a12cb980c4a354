"""A short real run of the method on the embedded model: TyDi QA GoldP English + Tatoeba en-de alignment.

50 optimizer steps of a plain torch AdamW loop (no DeepSpeed) over a fixed small pool of QA features and
parallel pairs; the task loss and the alignment loss must both fall. Prints the curve.
Prefixes go into the top 4 layers only and there is no input-level soft prompt, so backward stops at
layer 8 of 12: about 4.5 minutes of CPU time in all (a 4-token soft prompt needs backward through every
layer and about 2.6x that). The soft prompt's correctness is covered by the fast tests.
"""

import time

import pytest
import torch

from dsxfer.config import load_config
from dsxfer.data.qa import featurize_qa, pad_token_id
from dsxfer.data.readers import read_squad_json
from dsxfer.data.tasks import resolve_data_dir, tatoeba_pairs
from dsxfer.method.model import TransferModel


def align_batch(pairs, tokenizer, max_length):
    src = tokenizer([p.src for p in pairs], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    tgt = tokenizer([p.tgt for p in pairs], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"align_src_input_ids": src["input_ids"], "align_src_attention_mask": src["attention_mask"],
            "align_tgt_input_ids": tgt["input_ids"], "align_tgt_attention_mask": tgt["attention_mask"],
            "align_pair_ids": torch.tensor([int(p.id.rsplit(":", 1)[1]) for p in pairs])}


@pytest.mark.slow
def test_fifty_steps_task_and_alignment_losses_fall(tmp_path):
    from dsxfer.method.backbone import load_backbone, load_tokenizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = load_config(None, [
        "model.max_length=128", "model.doc_stride=32", "prompts.length=0", "injection.length=8",
        "injection.layers=top_k", "injection.top_k=4", "injection.reparam=true", "freezing.strategy=frozen",
        "alignment.loss=cosine", "alignment.layers=[-1]", "alignment.weight=10.0", "alignment.batch_size=16",
        f"train.output_dir={tmp_path}", "train.max_steps=50"])
    tokenizer = load_tokenizer(None)
    model = TransferModel(load_backbone(None, task="qa"), cfg, tokenizer)
    print("\n" + model.summary())

    data = resolve_data_dir(None)
    examples = list(read_squad_json(data / "tydiqa" / "tydiqa.goldp.en.train.json", "en"))[:24]
    feats = featurize_qa(examples, tokenizer, max_length=128, doc_stride=32, reserved_tokens=model.num_virtual_tokens)
    labelled = [i for i in range(len(feats)) if feats.start_positions[i] != feats.null_index[i]][:24]
    pairs = list(tatoeba_pairs("deu", max_pairs=48))
    pad = pad_token_id(tokenizer)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    model.train()
    task_curve, align_curve = [], []
    start = time.time()
    for step in range(50):
        model.set_step(step)
        rows = [labelled[(step * 4 + j) % len(labelled)] for j in range(4)]
        batch = feats.batch(rows, pad, with_labels=True)
        lo = (step * 16) % len(pairs)
        batch.update(align_batch(pairs[lo:lo + 16], tokenizer, 48))
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        task_curve.append(float(out["task_loss"].detach()))
        align_curve.append(float(out["align_loss"].detach()))
    elapsed = time.time() - start
    fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)
    print(f"task loss  : {fmt(task_curve)}")
    print(f"align loss : {fmt(align_curve)}")
    first = lambda xs: sum(xs[:10]) / 10
    last = lambda xs: sum(xs[-10:]) / 10
    print(f"task  first10 {first(task_curve):.4f} -> last10 {last(task_curve):.4f}")
    print(f"align first10 {first(align_curve):.4f} -> last10 {last(align_curve):.4f}")
    print(f"50 steps in {elapsed:.0f} s; teacher rows computed {model.teacher_cache.teacher_forwards} for {len(pairs)} pairs")
    assert model.teacher_cache.teacher_forwards == len(pairs)  # 48 pairs, 3 epochs of pairs: computed once each
    assert last(task_curve) < 0.8 * first(task_curve)
    assert last(align_curve) < 0.8 * first(align_curve)
