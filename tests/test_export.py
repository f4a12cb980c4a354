"""Export: dsxfer files that load_trained reads, and PEFT adapter folders that peft loads with the same outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dsxfer import engine as eng
from dsxfer.export import export_run
from dsxfer.model import load_trained
from dsxfer.train import TrainData, run_training
from test_engine import ds_json, tiny_cfg


def _tiny_folder(tmp_path, arch):
    from dsxfer.backbone import tiny_model

    model, tokenizer = tiny_model(arch, seed=0)
    folder = tmp_path / f"tiny-{arch}"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder, tokenizer


def _qa_batches(tokenizer, n=16):
    from dsxfer.data.qa import pad_token_id

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (n, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0
    ids = torch.where(mask.bool(), ids, pad_token_id(tokenizer))
    starts = torch.randint(0, 5, (n,), generator=g)

    def make(idx):
        idx = torch.tensor(idx)
        return {"input_ids": ids[idx], "attention_mask": mask[idx], "start_positions": starts[idx], "end_positions": starts[idx] + 1}
    from dsxfer.train import Batches
    return Batches(n, make), ids[:4], mask[:4]


def _train(tmp_path, arch, name, ds=None, **sections):
    folder, tokenizer = _tiny_folder(tmp_path, arch)
    cfg_path = None
    if ds is not None:
        cfg_path = tmp_path / f"{name}.json"
        cfg_path.write_text(json.dumps(ds))
    sections.setdefault("deepspeed", {})["config"] = str(cfg_path) if cfg_path else None
    cfg = tiny_cfg(tmp_path / name, model={"name_or_path": str(folder)}, train={"max_steps": 4}, **sections)
    from dsxfer.model import build_transfer_model

    with eng.zero3_construction(eng.build_ds_config(cfg, 1)):
        model = build_transfer_model(cfg)
    batches, ids, mask = _qa_batches(tokenizer)
    run_training(cfg, model, TrainData(task=batches), quiet=True)
    return tmp_path / name, folder, ids, mask


def _dsxfer_hidden(run_dir, ids, mask):
    model = load_trained(run_dir)
    with torch.no_grad():
        out, n = model._encode(ids, mask, None, prompted=True)
    return out.last_hidden_state[:, n:], n


def test_prompt_tuning_export_matches_dsxfer(tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    run, folder, ids, mask = _train(tmp_path, "xlm-roberta", "prompt", prompts={"length": 3}, injection={"length": 0})
    lines = export_run(run)
    out = run / "export"
    assert any("PROMPT_TUNING" in line for line in lines)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(folder)), str(out / "peft_prompt_tuning")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
    ours, n = _dsxfer_hidden(run, ids, mask)
    assert n == 3 and theirs.shape[1] == ids.shape[1] + 3
    torch.testing.assert_close(theirs[:, n:][mask.bool()], ours[mask.bool()], atol=1e-5, rtol=1e-5)
    # the head file is the trained head, which turns these states into dsxfer's start/end logits
    head = load_file(str(out / "head.safetensors"))
    trained = load_file(str(run / "trainable.safetensors"))
    assert torch.equal(head["span.weight"], trained["head.span.weight"])


def test_lora_export_matches_dsxfer(tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    run, folder, ids, mask = _train(tmp_path, "xlm-roberta", "lora", prompts={"length": 0}, injection={"length": 0},
                                    adapters={"lora": True, "r": 4, "alpha": 8, "target_modules": ["query", "value"]})
    lines = export_run(run)
    assert any("PEFT LORA" in line for line in lines)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(folder)), str(run / "export" / "peft_lora")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = AutoModel.from_pretrained(str(folder)).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    ours, _ = _dsxfer_hidden(run, ids, mask)
    torch.testing.assert_close(theirs[mask.bool()], ours[mask.bool()], atol=1e-5, rtol=1e-5)
    assert (theirs - plain).abs().max() > 1e-4  # the trained LoRA changed the outputs: the match is not trivial


def test_zero3_export_holds_trained_values_and_encoder_prefix_is_refused(tmp_path):
    raw = ds_json(3)
    raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    run, folder, ids, mask = _train(tmp_path, "xlm-roberta", "z3", ds=raw, prompts={"length": 2},
                                    injection={"length": 2, "reparam": True, "reparam_hidden": 8})
    lines = export_run(run)
    assert any("skipped PEFT PREFIX_TUNING: peft refuses encoder" in line for line in lines)
    merged = load_file(str(run / "export" / "prefixes.safetensors"))  # the MLP evaluated: (Hkv, P, D) per layer
    assert sorted(merged) == ["prefix.0.key", "prefix.0.value", "prefix.1.key", "prefix.1.value"]
    assert all(v.shape == (4, 2, 8) for v in merged.values())
    exported = load_file(str(run / "export" / "trainable.safetensors"))
    trained = load_file(str(run / "trainable.safetensors"))
    assert set(exported) == set(trained) and any(k.startswith("injection.") for k in exported)
    for k, v in exported.items():
        assert v.numel() > 0 and torch.equal(v, trained[k]), k
    ckpt_file = sorted((run / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"
    saved = load_file(str(ckpt_file))
    assert all(torch.equal(saved[k], exported[k]) for k in exported)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_tuning_export_matches_dsxfer_on_a_decoder(tmp_path, arch):
    from peft import PeftModel
    from transformers import AutoModel

    run, folder, ids, mask = _train(tmp_path, arch, "prefix", prompts={"length": 0},
                                    injection={"length": 3, "layers": "all", "reparam": True, "reparam_hidden": 8})
    mask = torch.ones_like(mask)  # decoders: right padding does not change earlier positions; compare full rows
    lines = export_run(run)
    assert any("PEFT PREFIX_TUNING" in line and "wrote" in line for line in lines), lines
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(folder)), str(run / "export" / "peft_prefix_tuning")).eval()
    with torch.no_grad():  # peft puts real tokens at positions P.. (the export compensates, see dsxfer.export)
        theirs = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = AutoModel.from_pretrained(str(folder)).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    ours, _ = _dsxfer_hidden(run, ids, mask)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (theirs - plain).abs().max() > 1e-4
