"""Frozen-activation cache (dsxfer.method.cache): the cached path trains exactly like the uncached one.

Real tiny XLM-R / BERT / Llama backbones, the real TransferModel, a real DeepSpeed ZeRO-3 engine in one
process, real files for the on-disk cache.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from dsxfer.training import engine as eng
from tiny import align_data, build, ds_json, dropout_backbone, method_cfg, qa_data, tiny_backbone, tiny_cfg

def batches(steps: int):
    """Task + pair micro-batches cycling over 8 windows and 8 pairs, so later steps hit the cache."""
    task, (pairs, _) = qa_data(n=8), align_data(n=12)
    for s in range(steps):
        idx = [(4 * s + j) % 8 for j in range(4)]
        yield {**task.make(idx), **pairs.make(idx)}


def torch_losses(cfg, steps: int = 6) -> tuple[list[float], object]:
    model = build(cfg)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(123)  # the dropout of layers 2-3 draws the same masks in both runs
    losses = []
    for step, batch in enumerate(batches(steps)):
        model.set_step(step)
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out["loss"].detach()))
    return losses, model


def test_cached_path_gives_the_uncached_losses_fp32(tmp_path):
    cached, model = torch_losses(method_cfg(tmp_path, "auto"))
    plain, reference = torch_losses(method_cfg(tmp_path, "disabled"))
    assert model.activation_cache is not None and model.activation_cache.start == 2
    assert reference.activation_cache is None
    # task windows and both sides of the pairs went through the cache, and later steps were served from it
    assert model.activation_cache.hits > 0 and model.activation_cache.misses == 16 + 8
    assert all(abs(a - b) <= 1e-6 for a, b in zip(cached, plain)), (cached, plain)
    assert len(set(round(x, 4) for x in cached)) > 1  # the losses move: training happened


def test_frozen_layers_below_the_first_open_one_run_without_dropout(tmp_path):
    model = build(method_cfg(tmp_path, "disabled"))
    model.train()
    assert model.first_open_layer == 2
    layers = model.backbone.encoder.layer
    assert not model.backbone.embeddings.training and not layers[0].training and not layers[1].training
    assert layers[2].training and layers[3].training and model.head.training


def test_cached_path_under_zero3_gives_the_uncached_losses(tmp_path):
    eng.init_distributed()

    def run(cache: str) -> tuple[list[float], object]:
        cfg = method_cfg(tmp_path / cache, cache, train={"micro_batch_size": 4})
        raw = ds_json(3)
        raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every tensor
        ds = eng.build_ds_config(cfg, 1, raw, "zero3.json")
        engine, _, _ = eng.initialize(build(cfg, ds), cfg, ds)
        assert engine.zero_optimization_stage() == 3
        engine.train()
        torch.manual_seed(123)
        losses = []
        for step, batch in enumerate(batches(5)):
            engine.module.set_step(step)
            out = engine(batch)
            engine.backward(out["loss"])
            engine.step()
            losses.append(float(out["loss"].detach()))
        return losses, engine.module

    cached, module = run("auto")
    plain, _ = run("disabled")
    assert module.activation_cache.hits > 0
    assert all(abs(a - b) <= 1e-6 for a, b in zip(cached, plain)), (cached, plain)


def test_on_disk_cache_is_reused_and_a_bad_checksum_is_ignored(tmp_path):
    folder = tmp_path / "acache"
    cfg = method_cfg(tmp_path, "auto", model={"activation_cache_dir": str(folder)})
    first = build(cfg)
    first.eval()
    batch = next(batches(1))
    with torch.no_grad():
        expected = first(batch)["start_logits"]
    first.activation_cache.flush()
    shards = sorted(folder.glob("*/*.safetensors"))
    assert len(shards) == 1 and shards[0].with_suffix(".sha256").is_file()

    second = build(cfg)  # a later run with the same backbone: every row comes from the disk
    second.eval()
    with torch.no_grad():
        again = second(batch)["start_logits"]
    assert second.activation_cache.misses == 0 and second.activation_cache.hits == 12
    assert torch.equal(expected, again)

    shards[0].write_bytes(shards[0].read_bytes()[:-8] + b"\0" * 8)  # damaged on disk
    third = build(cfg)
    third.eval()
    with torch.no_grad():
        third(batch)
    assert third.activation_cache.skipped_shards == [shards[0].name] and third.activation_cache.misses == 12
    assert "wrong checksum" in third.activation_cache.summary()


def test_a_bottom_that_differs_in_one_weight_gets_its_own_cache_folder(tmp_path):
    from dsxfer.method.cache import weight_fingerprint

    cfg = method_cfg(tmp_path, "auto")
    a, b = build(cfg), build(cfg)
    bottom = lambda m: [m.backbone.embeddings, *list(m.backbone.encoder.layer)[: m.activation_cache.start]]
    assert weight_fingerprint(bottom(a)) == weight_fingerprint(bottom(b))  # the same weights, the same folder
    with torch.no_grad():  # one entry of a layer below L moved by one ulp: its rows are other rows
        w = b.backbone.encoder.layer[0].attention.self.query.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    assert weight_fingerprint(bottom(a)) != weight_fingerprint(bottom(b))
    b2 = build(cfg)
    with torch.no_grad():  # a layer at or above L is not part of the bottom
        b2.backbone.encoder.layer[b2.activation_cache.start].attention.self.query.weight.add_(1.0)
    assert weight_fingerprint(bottom(a)) == weight_fingerprint(bottom(b2))


@pytest.mark.parametrize("change, reason", [
    ({"model": {"activation_cache": "disabled"}}, "activation cache: disabled (model.activation_cache=disabled)"),
    ({"prompts": {"length": 3, "init": "random"}}, "not used: nothing below layer 0 is fixed (an input-level soft prompt"),
    ({"adapters": {"lora": True}}, "not used: nothing below layer 0 is fixed (LoRA in layer 0"),
    ({"injection": {"layers": "all"}}, "not used: nothing below layer 0 is fixed (prefixes start at layer 0)"),
    ({"alignment": {"layers": [1]}}, "not used: alignment.layers=[1] reads hidden state 1, below the first open layer 2"),
])
def test_the_log_line_says_why_the_cache_is_not_used(tmp_path, change, reason):
    model = build(method_cfg(tmp_path, "auto", **change))
    assert model.activation_cache is None
    assert reason in model.activation_cache_note


def test_decoder_backbones_say_the_cache_is_not_used(tmp_path):
    from dsxfer.method.model import TransferModel
    model = TransferModel(tiny_backbone("llama"), method_cfg(tmp_path, "auto", injection={"top_k": 1}))
    assert model.activation_cache is None
    assert "not used: LlamaModel is not an encoder" in model.activation_cache_note


def test_cache_is_used_for_bert_and_serves_the_same_logits(tmp_path):
    from dsxfer.method.model import TransferModel
    cfg = method_cfg(tmp_path, "auto", injection={"top_k": 1}, freezing={"strategy": "frozen"})
    backbone = tiny_backbone("bert")
    model = TransferModel(backbone, cfg).eval()
    assert model.activation_cache.start == 1
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, 120, (3, 9), generator=g), "attention_mask": torch.ones(3, 9, dtype=torch.long),
             "token_type_ids": torch.tensor([[0] * 4 + [1] * 5] * 3)}
    batch["attention_mask"][1, 6:] = 0
    with torch.no_grad():
        cached = model(batch)["start_logits"]
        model.activation_cache, cache = None, model.activation_cache
        plain = model(batch)["start_logits"]
    real = batch["attention_mask"].bool()
    assert torch.allclose(cached[real], plain[real], atol=1e-6) and cache.misses == 3


def test_teacher_runs_under_inference_mode(tmp_path):
    model = build(method_cfg(tmp_path, "disabled"))
    seen = []
    handle = model.backbone.embeddings.register_forward_pre_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
    try:
        model.teacher_vectors(next(batches(1)))
    finally:
        handle.remove()
    assert seen == [True]


def test_train_log_says_the_cache_is_used_and_how_big_it_got(tmp_path):
    from dsxfer.data.build import TrainData
    from dsxfer.training.train import run_training

    cfg = method_cfg(tmp_path, "auto", alignment={"enabled": False}, train={"max_steps": 4, "micro_batch_size": 4})
    run_training(cfg, build(cfg), TrainData(task=qa_data(n=8)), quiet=True)
    log = (tmp_path / "train.log").read_text()
    assert "activation cache: used: layers 0..1 of 4 are frozen and unprompted (prefixes start at layer 2)" in log
    assert "activation cache: 8 rows (" in log and "entering layer 2; 8 row lookups served, 8 computed" in log
    assert "forward through layers 2..3 + head, input gradients through layers 2..3 + head" in log


def test_evaluation_of_a_trained_model_runs_under_inference_mode(tmp_path):
    from dsxfer.evaluation.evaluate import transfer_predictor

    model = build(method_cfg(tmp_path, "auto")).eval()
    seen = []
    model.backbone.encoder.layer[3].register_forward_pre_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
    batch = qa_data(n=4).make([0, 1, 2, 3])
    start, _ = transfer_predictor(model)({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    assert seen == [True] and not start.requires_grad
