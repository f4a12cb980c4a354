"""Peers: the baselines a user would pick instead of dsxfer, written with PEFT's and the HF Trainer's own API.

Nothing here uses dsxfer's model, prompts, engine or training loop: a peer is an
`AutoModelForQuestionAnswering` (a fresh QA head on the backbone), wrapped by `peft.get_peft_model` or
left whole, trained by `transformers.Trainer` on windows featurized the usual transformers way
(`featurize_windows`). dsxfer supplies only the rows to train on (`training_rows`: the same source pool,
source dev hold-out and k shots that `dsxfer train` derives from the same config) and the scorer
(`peer_predictor` plugs into `dsxfer.evaluation.evaluate.run_eval`, so a peer is scored on the same
questions with the same metric code as a dsxfer run).

Kinds:
  peft_lora     LoRA (r, alpha, target modules) through `LoraConfig` + `get_peft_model`
  peft_prompt   prompt tuning (`PromptTuningConfig`, n virtual tokens). PEFT's QA wrapper prepends the
                virtual tokens to the sequence but hands `start_positions`/`end_positions` to the model
                unchanged, so every label would point n tokens early; `shift_positions` moves them by n,
                and prediction drops the n virtual columns of the logits.
  full_ft       full fine-tuning of backbone and head (no PEFT)

bench/cpu_train.py times the same peers against dsxfer; both import the pieces from here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PEER_KINDS = ("peft_lora", "peft_prompt", "full_ft")


# ------------------------------------------------------------------------------------------ data


def featurize_windows(examples: Sequence[Any], tokenizer, max_length: int, stride: int, with_labels: bool) -> list[dict]:
    """Question + context windows the usual transformers way: overflowing tokens with a stride, labels
    from the offset mapping (a window that does not hold the whole answer points at the CLS token)."""
    enc = tokenizer([ex.question for ex in examples], [ex.context for ex in examples], truncation="only_second",
                    max_length=max_length, stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    windows = []
    for i, offsets in enumerate(enc["offset_mapping"]):
        window = {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]}
        if with_labels:
            ex = examples[enc["overflow_to_sample_mapping"][i]]
            in_context = [k for k, s in enumerate(enc.sequence_ids(i)) if s == 1]
            first_char, last_char = ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0])
            start = end = 0
            if offsets[in_context[0]][0] <= first_char and offsets[in_context[-1]][1] >= last_char:
                start = next(k for k in in_context if offsets[k][1] > first_char)
                end = next(k for k in reversed(in_context) if offsets[k][0] < last_char)
            window.update(start_positions=start, end_positions=end)
        windows.append(window)
    return windows


def shift_positions(windows: Sequence[dict], n_virtual: int) -> list[dict]:
    """Labels for a model that sees n_virtual prompt tokens before the window: every start/end index + n_virtual
    (a window without the answer then points at its CLS token, now at position n_virtual)."""
    return [{**w, "start_positions": w["start_positions"] + n_virtual, "end_positions": w["end_positions"] + n_virtual}
            for w in windows]


def training_rows(cfg) -> dict[str, Any]:
    """The rows `dsxfer train` trains a QA config on, drawn by the same code (dsxfer.data.build.training_rows):
    {"pool": source training examples, "dev": the held-out source dev examples, "shots": {lang: examples}}."""
    from dsxfer.data.build import training_rows as dsxfer_rows
    from dsxfer.errors import ConfigError

    d = cfg.data
    if cfg.model.task != "qa" or d.train_files or d.translate_train or d.codeswitch_prob > 0:
        raise ConfigError("peers train on a benchmark QA task's source rows and shots only (no train_files, translate-train or "
                          "code-switched pseudo data)")
    rows = dsxfer_rows(cfg)
    return {"pool": rows.pool, "dev": rows.dev, "shots": rows.shots}


# ------------------------------------------------------------------------------------------ models


def build_peer(kind: str, model_path: str, *, seed: int, lora_r: int = 8, lora_alpha: int = 16,
               lora_modules: Sequence[str] = ("query", "value"), prompt_tokens: int = 20):
    """(model, tokenizer, n_virtual_tokens) for a peer kind, through transformers and PEFT only."""
    import torch
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    if kind not in PEER_KINDS:
        from dsxfer.errors import ConfigError

        raise ConfigError(f"unknown peer '{kind}': choose one of {', '.join(PEER_KINDS)}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(seed)  # the fresh QA head (and PEFT's own initialisation) follow the cell's seed
    model = AutoModelForQuestionAnswering.from_pretrained(model_path)
    n_virtual = 0
    if kind == "peft_lora":
        model = get_peft_model(model, LoraConfig(task_type="QUESTION_ANS", r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                                 target_modules=list(lora_modules)))
    elif kind == "peft_prompt":
        model = get_peft_model(model, PromptTuningConfig(task_type="QUESTION_ANS", num_virtual_tokens=prompt_tokens))
        n_virtual = prompt_tokens
    return model, tokenizer, n_virtual


def step_file_callback(path: Path):
    """A TrainerCallback that writes 'step N of M' to path after every optimizer step (the harness's progress bar)."""
    from transformers import TrainerCallback

    class StepFile(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            path.write_text(f"step {state.global_step} of {state.max_steps}\n", encoding="utf-8")

    return StepFile()


def train_peer(kind: str, model_path: str, examples: Sequence[Any], *, out_dir: Path, seed: int, max_length: int, stride: int,
               steps: int, batch_size: int, lr: float, warmup_steps: int, weight_decay: float = 0.0, use_cpu: bool = True,
               progress_file: Path | None = None, **peer_settings: Any) -> dict[str, Any]:
    """Train a peer with the HF Trainer as a user would: AdamW, linear schedule after warm-up, clip 1.0,
    right padding per batch (DataCollatorWithPadding). Returns {model, tokenizer, n_virtual, windows, train_s, ...}."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    model, tokenizer, n_virtual = build_peer(kind, model_path, seed=seed, **peer_settings)
    # the virtual tokens take part of the length budget, as dsxfer reserves its soft prompt's
    windows = featurize_windows(examples, tokenizer, max_length - n_virtual, stride, with_labels=True)
    if n_virtual:
        windows = shift_positions(windows, n_virtual)
    if kind == "peft_prompt" or "token_type_ids" not in tokenizer.model_input_names:
        windows = [{k: v for k, v in w.items() if k != "token_type_ids"} for w in windows]
    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                             learning_rate=lr, lr_scheduler_type="linear", warmup_steps=warmup_steps, weight_decay=weight_decay,
                             max_grad_norm=1.0, logging_steps=max(1, steps), report_to=[], save_strategy="no", use_cpu=use_cpu,
                             seed=seed, data_seed=seed, disable_tqdm=True)
    callbacks = [step_file_callback(progress_file)] if progress_file is not None else []
    trainer = Trainer(model=model, args=args, train_dataset=windows, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    return {"model": model.eval(), "tokenizer": tokenizer, "n_virtual": n_virtual, "windows": len(windows), "train_s": train_s,
            "steps": steps, "features_per_s": steps * batch_size / train_s,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def peer_predictor(model, tokenizer, n_virtual: int, *, name: str, model_name: str, max_length: int, doc_stride: int):
    """A dsxfer.evaluation.evaluate.Predictor for a trained peer: logits over the window's own tokens
    (the n virtual prompt columns PEFT puts first are dropped), the virtual tokens reserved out of max_length."""
    import torch

    from dsxfer.evaluation.evaluate import Predictor

    device = next(model.parameters()).device
    keep = ("input_ids", "attention_mask") if n_virtual else ("input_ids", "attention_mask", "token_type_ids")

    @torch.no_grad()
    def predict(batch: dict):
        out = model(**{k: v.to(device) for k, v in batch.items() if k in keep})
        return out.start_logits[:, n_virtual:], out.end_logits[:, n_virtual:]

    return Predictor(predict, tokenizer, n_virtual, name, model_name, max_length, doc_stride)
