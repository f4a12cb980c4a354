"""TransferModel: heads for encoders and decoders, the loss composition, trainable state, config checks."""

import pytest
import torch
import torch.nn.functional as F

from dsxfer.errors import ConfigError, DataError
from dsxfer.method.model import TransferModel
from tiny import config, tiny_backbone


def pair_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 120, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    mask[2, 7:] = 0
    ids[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": (torch.arange(9) > 3).long().expand(3, -1),
            "labels": torch.tensor([0, 1, 1])}


@pytest.mark.parametrize("arch", ["xlm-roberta", "bert", "llama", "qwen2"])
def test_classification_pools_first_token_for_encoders_last_real_token_for_decoders(arch):
    model = TransferModel(tiny_backbone(arch), config("model.task=classification", "model.num_labels=3",
                                                      "prompts.length=0", "injection.length=0")).eval()
    plain = tiny_backbone(arch).eval()
    b = pair_batch()
    kwargs = {k: b[k] for k in ("input_ids", "attention_mask")}
    if arch == "bert":
        kwargs["token_type_ids"] = b["token_type_ids"]
    else:
        b.pop("token_type_ids")
    with torch.no_grad():
        out = model(b)
        states = plain(**kwargs).last_hidden_state
    last = b["attention_mask"].sum(1) - 1
    pooled = states[torch.arange(3), last] if arch in ("llama", "qwen2") else states[:, 0]
    expected = model.head.out(pooled)
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["task_loss"], F.cross_entropy(expected, b["labels"]), atol=1e-5, rtol=1e-5)
    assert out["logits"].shape == (3, 3)


@pytest.mark.parametrize("arch", ["xlm-roberta", "qwen2"])
def test_qa_logits_cover_real_tokens_only_and_loss_is_mean_of_start_end(arch):
    model = TransferModel(tiny_backbone(arch), config("prompts.length=4", "injection.length=2")).eval()
    b = pair_batch()
    b.pop("labels")
    b.pop("token_type_ids")
    b["start_positions"] = torch.tensor([1, 2, 3])
    b["end_positions"] = torch.tensor([2, 2, 6])
    with torch.no_grad():
        out = model(b)
    assert out["start_logits"].shape == out["end_logits"].shape == b["input_ids"].shape
    expected = (F.cross_entropy(out["start_logits"], b["start_positions"]) + F.cross_entropy(out["end_logits"], b["end_positions"])) / 2
    torch.testing.assert_close(out["task_loss"], expected)
    assert float(out["align_loss"]) == 0.0 and float(out["preserve_loss"]) == 0.0
    torch.testing.assert_close(out["loss"], expected)


def test_preservation_is_kl_between_unprompted_and_prompted_head_outputs():
    model = TransferModel(tiny_backbone("xlm-roberta"), config("model.task=classification", "prompts.length=3",
                                                               "alignment.preservation_weight=0.5"))
    model.train()
    model.head.dropout.p = 0.0  # deterministic for the comparison
    b = pair_batch()
    b.pop("token_type_ids")
    out = model(b)
    with torch.no_grad():
        unprompted = model._task_outputs(b, prompted=False)["logits"]
    p = torch.softmax(unprompted, -1)
    q = torch.softmax(out["logits"].detach(), -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(expected) > 1e-6
    torch.testing.assert_close(out["preserve_loss"].detach(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["loss"].detach(), out["task_loss"].detach() + 0.5 * expected, atol=1e-6, rtol=1e-5)


def test_trainable_state_round_trip_and_mismatch_errors(tmp_path):
    cfg = config("prompts.length=3", "injection.length=2", "adapters.lora=true", "freezing.strategy=bias_only")
    model = TransferModel(tiny_backbone("xlm-roberta"), cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_()
    path = model.save_trainable(tmp_path)
    assert (tmp_path / "soft_prompt.safetensors").is_file()
    from safetensors.torch import load_file

    state = load_file(str(path))
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = TransferModel(tiny_backbone("xlm-roberta"), cfg)
    fresh.load_trainable_state_dict(state)
    for name, p in fresh.named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[name], rtol=0, atol=0)
    with pytest.raises(DataError, match="is missing"):
        fresh.load_trainable_state_dict({k: v for k, v in state.items() if "head" not in k})
    other = TransferModel(tiny_backbone("xlm-roberta"), config("prompts.length=3", "injection.length=0"))
    with pytest.raises(DataError, match="do not belong to this model"):
        other.load_trainable_state_dict(state)


def test_language_prompt_trained_here_composes_after_a_task_prompt(tmp_path):
    task_run = TransferModel(tiny_backbone("xlm-roberta"), config("prompts.length=3", "injection.length=0"))
    task_run.save_trainable(tmp_path / "task")
    lang_run = TransferModel(tiny_backbone("xlm-roberta"), config(
        "prompts.length=2", "injection.length=0", f"prompts.task_prompt={tmp_path / 'task' / 'soft_prompt.safetensors'}"))
    trainable = [n for n, p in lang_run.named_parameters() if p.requires_grad]
    assert "prompt.parts.trainable.embeddings" in trainable and not any("parts.task" in n for n in trainable)
    assert lang_run.num_virtual_tokens == 5


@pytest.mark.parametrize("override, message", [
    (["prompts.length=70", "model.max_length=64"], "virtual tokens leave no room for real tokens in model.max_length=64"),
    (["model.max_length=200", "model.doc_stride=16"], "model.max_length=200 is invalid: this backbone takes at most 80 positions"),
    (["freezing.strategy=top_k", "freezing.top_k=5"], "freezing.top_k=5 is invalid: this backbone has 2 layers"),
    (["injection.layers=top_k", "injection.top_k=3"], "injection.top_k=3 is invalid: this backbone has 2 layers"),
    (["prompts.task_prompt=/nonexistent/task.safetensors"], "prompt file not found: /nonexistent/task.safetensors"),
])
def test_configs_that_cannot_work_fail_before_training(override, message):
    with pytest.raises((ConfigError, DataError)) as e:
        TransferModel(tiny_backbone("xlm-roberta"), config(*override))
    assert message in str(e.value)


def test_build_then_load_trained_reproduces_outputs(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dsxfer.method.model import build_transfer_model, load_trained

    backbone = tiny_backbone("xlm-roberta")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 120)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", cls_token="<s>", sep_token="</s>")
    backbone.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    run = tmp_path / "run"
    cfg = config(f"model.name_or_path={tmp_path / 'tiny'}", "prompts.length=3", "injection.length=2",
                 "freezing.strategy=layernorm", f"train.output_dir={run}")
    model = build_transfer_model(cfg)
    b = pair_batch()
    b.pop("labels")
    b.pop("token_type_ids")
    b["start_positions"], b["end_positions"] = torch.tensor([1, 2, 3]), torch.tensor([2, 4, 5])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(b)["loss"].backward()
        optimizer.step()
    model.eval()
    model.save_trainable(run)
    (run / "config.yaml").write_text(cfg.to_yaml())
    restored = load_trained(run)
    assert not restored.training
    with torch.no_grad():
        expected, got = model(b), restored(b)
    torch.testing.assert_close(got["start_logits"], expected["start_logits"], rtol=0, atol=0)
    fresh = build_transfer_model(cfg)
    with torch.no_grad():
        assert not torch.equal(fresh.eval()(b)["start_logits"], expected["start_logits"])
    with pytest.raises(DataError, match="lacks config.yaml or trainable.safetensors"):
        load_trained(tmp_path)


def test_merged_lora_gives_the_unmerged_outputs():
    """merge_lora folds every adapter into its weight: the same logits, from plain Linear products."""
    from peft.tuners.lora import LoraLayer

    cfg = config("adapters.lora=true", "adapters.r=4", "adapters.alpha=8", "prompts.length=0", "injection.length=0")
    model = TransferModel(tiny_backbone("xlm-roberta"), cfg).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.5)  # B starts at zero: make the adapters change the output
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, 90, (3, 17), generator=g), "attention_mask": torch.ones(3, 17, dtype=torch.long)}
    batch["attention_mask"][1, 11:] = 0
    with torch.no_grad():
        before = model(batch)
        plain = TransferModel(tiny_backbone("xlm-roberta"), cfg).eval()(batch)  # fresh adapters (B = 0): the backbone alone
        assert (before["start_logits"] - plain["start_logits"]).abs().max() > 1e-2  # the adapters matter here
        adapted = sum(isinstance(m, LoraLayer) for m in model.modules())
        assert adapted > 0 and model.merge_lora() == adapted and model.merge_lora() == 0
        after = model(batch)
    for key in ("start_logits", "end_logits"):
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-5)
    assert TransferModel(tiny_backbone("xlm-roberta"), config()).merge_lora() == 0


@pytest.mark.parametrize("task", ["qa", "classification"])
def test_head_init_normal_follows_the_backbone_initializer_range(task):
    """model.head_init=normal starts the head as transformers' task models do (N(0, initializer_range), zero bias);
    the default keeps torch's Linear initialisation (uniform within 1/sqrt(hidden), a nonzero bias)."""
    backbone = tiny_backbone("xlm-roberta")
    backbone.config.initializer_range = 0.3  # far from both defaults, so the test tells them apart
    hidden = backbone.config.hidden_size
    torch.manual_seed(0)
    normal = TransferModel(backbone, config(f"model.task={task}", "model.head_init=normal"))
    torch.manual_seed(0)
    default = TransferModel(tiny_backbone("xlm-roberta"), config(f"model.task={task}"))
    for head, kind in ((normal.head, "normal"), (default.head, "torch")):
        linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        weights = torch.cat([m.weight.flatten() for m in linears])
        assert weights.numel() >= 64
        if kind == "normal":
            assert abs(weights.std().item() - 0.3) < 0.06 and all(torch.count_nonzero(m.bias) == 0 for m in linears)
        else:
            assert weights.abs().max().item() <= 1 / hidden ** 0.5 + 1e-6 and any(torch.count_nonzero(m.bias) > 0 for m in linears)
