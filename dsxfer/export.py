"""Export a trained run: dsxfer's own files plus PEFT adapter folders where PEFT can reproduce the run.

<export>/trainable.safetensors + config.yaml     what dsxfer.method.model.load_trained reads (a run folder)
<export>/head.safetensors                        the task head alone (QA: span.weight (2, H), span.bias (2,))
<export>/prefixes.safetensors                    merged per-layer prefixes prefix.<layer>.key / .value (Hkv, P, D)
<export>/peft_prompt_tuning/                     soft prompt  -> PROMPT_TUNING  (prompt_embeddings (n, H))
<export>/peft_lora/                              LoRA         -> LORA
<export>/peft_prefix_tuning/                     prefixes     -> PREFIX_TUNING  (prefixes in every layer)
<export>/README.md                               what was written, what was skipped and why

Each PEFT folder holds adapter_config.json (task type FEATURE_EXTRACTION, so PEFT's
`AutoPeftModelForFeatureExtraction` loads it; plain `AutoPeftModel` refuses any task type), the
adapter weights, the tokenizer, head.safetensors and a README.md with the loading code, which the tests
run. `base_model_name_or_path` is the model name, the absolute path of a local model folder, or
EMBEDDED_MODEL_NAME for the embedded default (no hub has it: `dsxfer.method.backbone.resolve_model_path` maps it
to dsxfer's cache folder). Loaded that way, PEFT gives the backbone hidden states dsxfer computes on the
real tokens to 1e-5 (fp32). What does not map is skipped with the reason:
- PREFIX_TUNING needs a prefix in every layer. PEFT concatenates P prefix positions to the keys and
  values of every layer under one attention mask, and a layer without a dsxfer prefix cannot be given
  P positions that draw no attention: a zero key still takes softmax weight exp(0) per position, and
  no fixed key scores far below the real keys for every query (the queries of a layer point in all
  directions). Runs with prefixes in some layers only (injection.layers=top_k or a list) keep them in
  dsxfer's files; train with injection.layers=all for a PEFT prefix export.
- Positions: PEFT counts the prefix as P cached positions, so real tokens sit at positions P, P+1, ...
  (encoders with learned absolute positions: XLM-R derives its position ids from the cache length,
  BERT slices its position table from there, and PEFT adds P to any position_ids it is given); dsxfer
  keeps real tokens at the backbone's own positions. Encoders: the folder's README passes
  position_ids = (the backbone's own positions) - P, which PEFT turns back into the backbone's own.
  RoPE decoders: the exported keys are rotated by +P instead (exact for standard rotary embeddings;
  partial or position-scaled rotary schemes are not covered), so no argument is needed.
- PEFT's prompt-learning models drop token_type_ids (with a warning): exact for XLM-R (one segment
  type) and for BERT inputs whose token_type_ids are all 0, not for BERT sentence pairs.
- A run that combines several parts (prompt + prefixes + LoRA) exports each part; only the
  combination of all of them equals dsxfer, and PEFT cannot stack prompt and prefix tuning.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dsxfer.errors import DataError

PEFT_TASK_TYPE = "FEATURE_EXTRACTION"  # PEFT's model class for a bare backbone (AutoModel): hidden states out
TOLERANCE = 1e-5  # max abs difference of the last hidden states, real tokens, fp32 (tests/test_export.py)


def base_model_reference(cfg) -> str:
    """What adapter_config.json names as the base model: a hub name as configured, a local folder as an
    absolute path, the embedded default as EMBEDDED_MODEL_NAME (which dsxfer maps to its cache)."""
    from dsxfer.method.backbone import EMBEDDED_MODEL_NAME, _is_embedded_folder, _looks_like_path

    name = cfg.model.name_or_path
    if name is None or str(name).strip() in ("", EMBEDDED_MODEL_NAME):
        return EMBEDDED_MODEL_NAME
    if _looks_like_path(str(name)):
        folder = Path(str(name)).expanduser().resolve()
        return EMBEDDED_MODEL_NAME if _is_embedded_folder(folder) else str(folder)
    return str(name)


def _real_positions_start(backbone) -> int | None:
    """First position id of an encoder's learned absolute positions as dsxfer feeds it (inputs_embeds):
    padding_idx + 1 for RoBERTa-style embeddings, 0 for BERT-style; None for rotary decoders."""
    embeddings = getattr(backbone, "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "position_embeddings"):
        return None
    if hasattr(embeddings, "create_position_ids_from_inputs_embeds"):
        return int(embeddings.padding_idx) + 1
    return 0


def _load_code(base_reference: str, folder_name: str) -> list[str]:
    from dsxfer.method.backbone import EMBEDDED_MODEL_NAME

    if base_reference == EMBEDDED_MODEL_NAME:
        return [
            "from peft import PeftModel",
            "from transformers import AutoModel",
            "from dsxfer.method.backbone import resolve_model_path  # maps the embedded model's name to dsxfer's cache folder",
            "",
            f'folder = "{folder_name}"',
            f'base = AutoModel.from_pretrained(resolve_model_path("{EMBEDDED_MODEL_NAME}"))',
            "model = PeftModel.from_pretrained(base, folder).eval()",
        ]
    return [
        "from peft import AutoPeftModelForFeatureExtraction",
        "",
        f'folder = "{folder_name}"',
        "model = AutoPeftModelForFeatureExtraction.from_pretrained(folder).eval()  # base model: adapter_config.json",
    ]


def _readme(model, kind: str, folder: Path, *, virtual_tokens: int = 0, position_start: int | None = None,
            prefix_length: int = 0) -> str:
    """README.md of a PEFT folder: what it is and the code that loads it and reproduces dsxfer's outputs."""
    base = base_model_reference(model.cfg)
    task = model.cfg.model.task
    call = ["    out = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state"]
    if position_start is not None and prefix_length:
        call = [
            f"    # PEFT counts the prefix as {prefix_length} cached positions and adds {prefix_length} to every position id it is",
            f"    # given; dsxfer keeps real tokens at the backbone's own positions ({position_start}, {position_start + 1}, ...):",
            f"    position_ids = (torch.arange(input_ids.shape[1]) + {position_start} - {prefix_length}).expand_as(input_ids)",
            "    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state",
        ]
    states = f"out[:, {virtual_tokens}:]  # PEFT puts the {virtual_tokens} virtual tokens first" if virtual_tokens else "out"
    if task == "qa":
        head = ['    start_logits, end_logits = (states @ head["span.weight"].T + head["span.bias"]).unbind(-1)',
                "    return states, (start_logits, end_logits)"]
    else:
        pool = ("states[torch.arange(states.shape[0]), attention_mask.sum(1) - 1]  # the last real token"
                if model.decoder else "states[:, 0]  # the first token (<s> / [CLS])")
        head = [f"    pooled = {pool}", '    return states, pooled @ head["out.weight"].T + head["out.bias"]']
    code = [
        "import torch",
        "from safetensors.torch import load_file",
        "from transformers import AutoTokenizer",
        *_load_code(base, f"path/to/{folder.name}"),
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
        'head = load_file(f"{folder}/head.safetensors")  # the trained task head',
        "",
        "",
        "def encode(input_ids, attention_mask):",
        '    """Last hidden states of the real tokens and the logits of the task head, as dsxfer computes them."""',
        *call,
        f"    states = {states}",
        *head,
        "",
        "",
        'batch = tokenizer(["Where does the cat sleep?"], ["The cat sleeps on the mat."], return_tensors="pt")',
        'states, logits = encode(batch["input_ids"], batch["attention_mask"])',
    ]
    what = {"prompt_tuning": f"the run's soft prompt ({virtual_tokens} virtual tokens) as PEFT PROMPT_TUNING",
            "lora": "the run's LoRA adapters as PEFT LORA",
            "prefix_tuning": f"the run's prefix keys/values ({prefix_length} per layer, every layer) as PEFT PREFIX_TUNING"}[kind]
    notes = [f"Outputs equal dsxfer's (`dsxfer.method.model.load_trained`) to {TOLERANCE:g} max abs difference of the last hidden "
             "states on the real tokens (fp32; checked by tests/test_export.py, which runs the code above)."]
    if position_start is not None and prefix_length:
        notes.append(f"Without `position_ids` PEFT shifts the real tokens {prefix_length} positions on and the hidden states "
                     "move far from dsxfer's (max abs difference about 2 on XLM-R and BERT; README.md of dsxfer, section Export).")
    if kind != "lora":
        notes.append("PEFT's prompt-learning models drop token_type_ids: for BERT inputs with a second segment "
                     "(token_type_ids 1) the outputs differ from dsxfer's; XLM-R has one segment type.")
    if base.startswith("dsxfer/"):
        notes.append(f"`{base}` (adapter_config.json: base_model_name_or_path) is dsxfer's embedded default model, not a "
                     "hub repository: `dsxfer.method.backbone.resolve_model_path` returns its cache folder (`dsxfer prepare-model` builds it).")
    return (f"# {folder.name}: {what}\n\n"
            f"Exported by `dsxfer export` from the run `{model.cfg.name}` ({'QA' if task == 'qa' else 'classification'} head) on the base model "
            f"`{base}`. Files: adapter_config.json + adapter_model.safetensors (PEFT, task type {PEFT_TASK_TYPE}), the tokenizer, "
            "head.safetensors (the task head).\n\n```python\n" + "\n".join(code) + "\n```\n\n"
            + "\n".join(f"- {n}" for n in notes) + "\n")


def _write_adapter(model, folder: Path, kind: str, config, tensors: dict[str, torch.Tensor], **readme) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(folder))
    head = {k[len("head."):]: v.detach().float().cpu().contiguous() for k, v in model.named_parameters() if k.startswith("head.")}
    save_file(head, str(folder / "head.safetensors"))
    (folder / "README.md").write_text(_readme(model, kind, folder, **readme), encoding="utf-8")
    return folder


def prompt_tuning_adapter(model, folder: Path) -> Path:
    """Soft prompt -> PROMPT_TUNING (virtual tokens prepended to inputs_embeds, like dsxfer)."""
    from peft import PromptTuningConfig

    prompt = model.prompt.parts["trainable"].embeddings.detach().float().cpu()
    bb = model.backbone.config
    config = PromptTuningConfig(task_type=PEFT_TASK_TYPE, num_virtual_tokens=prompt.shape[0], token_dim=bb.hidden_size,
                                num_transformer_submodules=1, num_attention_heads=bb.num_attention_heads,
                                num_layers=bb.num_hidden_layers, base_model_name_or_path=base_model_reference(model.cfg))
    return _write_adapter(model, folder, "prompt_tuning", config, {"prompt_embeddings": prompt}, virtual_tokens=prompt.shape[0])


def lora_adapter(model, folder: Path) -> Path:
    """LoRA -> LORA: dsxfer injects peft's own LoRA layers; only the names change (no 'backbone.', no adapter name)."""
    from peft import LoraConfig

    a = model.cfg.adapters
    tensors = {}
    for name, p in model.named_parameters():
        if "lora_" in name and name.startswith("backbone."):
            key = "base_model.model." + name[len("backbone."):].replace(".default.", ".")
            tensors[key] = p.detach().float().cpu()
    config = LoraConfig(task_type=PEFT_TASK_TYPE, r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.target_modules),
                        base_model_name_or_path=base_model_reference(model.cfg))
    return _write_adapter(model, folder, "lora", config, tensors)


def prefix_tuning_adapter(model, folder: Path) -> Path:
    """Prefixes -> PREFIX_TUNING: one (P, L * 2 * Hkv * D) table, per row the keys then values of each layer."""
    from peft import PrefixTuningConfig

    inj = model.injection
    bb = model.backbone.config
    if sorted(inj.layers) != list(range(bb.num_hidden_layers)):
        raise DataError(
            f"prefixes are injected in layers {inj.layers} only, and PEFT PREFIX_TUNING puts prefix positions into every "
            "layer: a layer without a dsxfer prefix cannot get positions that draw no attention (zero keys still take "
            "softmax weight), so PEFT would not reproduce this run; train with injection.layers=all to export it "
            "(the prefixes are in prefixes.safetensors and trainable.safetensors)")
    with torch.no_grad():
        prefixes = inj.forward()  # str(layer) -> (k, v), each (Hkv, P, D)
        rows = []
        for layer in range(bb.num_hidden_layers):
            k, v = prefixes[str(layer)]
            k = _shift_rotary(model.backbone, k, inj.length)
            for t in (k, v):
                rows.append(t.detach().float().cpu().permute(1, 0, 2).reshape(inj.length, -1))  # (P, Hkv * D)
        table = torch.cat(rows, dim=1)
    config = PrefixTuningConfig(task_type=PEFT_TASK_TYPE, num_virtual_tokens=inj.length, token_dim=bb.hidden_size, num_transformer_submodules=1,
                                num_attention_heads=bb.num_attention_heads, num_layers=bb.num_hidden_layers,
                                prefix_projection=False, base_model_name_or_path=base_model_reference(model.cfg))
    return _write_adapter(model, folder, "prefix_tuning", config, {"prompt_embeddings": table},
                          position_start=_real_positions_start(model.backbone), prefix_length=inj.length)


def _shift_rotary(backbone, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Rotate prefix keys by `shift` positions of the backbone's rotary embedding (no-op without one).

    PEFT's prefix is a key/value cache of P positions, so real tokens sit at positions P, P+1, ... and
    their queries are rotated P positions further than in dsxfer (which keeps real positions from 0 and
    never rotates prefix keys). (R(p + P) q) . k' = (R(p) q) . k holds for k' = R(P) k: rotating the prefix
    keys by +P gives PEFT exactly dsxfer's scores; real-to-real scores only see relative positions.
    """
    rotary = getattr(backbone, "rotary_emb", None)
    if rotary is None or shift == 0:
        return keys
    x = keys.float().unsqueeze(0)  # (1, Hkv, P, D)
    cos, sin = rotary(x, torch.full((1, 1), shift, dtype=torch.long))  # (1, 1, D) each
    cos, sin = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated_half * sin).squeeze(0)


def export_model(model, out: Path, config_yaml: str) -> list[str]:
    """Write every export of an in-memory TransferModel; returns one line per output or skipped mapping."""
    from safetensors.torch import save_file

    from dsxfer.method import trainable

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    state = trainable.gather(model)
    weights = trainable.write(state, out / trainable.TRAINABLE_FILE)
    (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    lines.append(f"wrote {weights} ({len(state)} tensors) and {out / 'config.yaml'} (dsxfer.method.model.load_trained)")
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    if head:
        save_file(head, str(out / "head.safetensors"))
        lines.append(f"wrote {out / 'head.safetensors'} (task head)")
    if "trainable" in model.prompt.parts:
        lines.append(f"wrote {prompt_tuning_adapter(model, out / 'peft_prompt_tuning')} (PEFT PROMPT_TUNING)")
    if model.cfg.adapters.lora:
        lines.append(f"wrote {lora_adapter(model, out / 'peft_lora')} (PEFT LORA)")
    if model.injection is not None:
        # plain per-layer keys/values (the reparameterisation MLP evaluated once): portable to any runtime
        save_file(model.injection.merged(), str(out / "prefixes.safetensors"))
        lines.append(f"wrote {out / 'prefixes.safetensors'} (per-layer prefix keys/values, (Hkv, P, D) each)")
        try:
            lines.append(f"wrote {prefix_tuning_adapter(model, out / 'peft_prefix_tuning')} (PEFT PREFIX_TUNING)")
        except DataError as e:
            lines.append(f"skipped PEFT PREFIX_TUNING: {e}")
    (out / "README.md").write_text(_export_readme(model, out, lines), encoding="utf-8")
    return lines


def _export_readme(model, out: Path, lines: list[str]) -> str:
    folders = sorted(p.name for p in out.glob("peft_*") if (p / "adapter_config.json").is_file())
    peft = (f"PEFT folders (each with its own README.md and loading code): {', '.join(folders)}." if folders else
            "No PEFT folder: nothing in this run maps onto a PEFT method that reproduces it (see the skipped lines).")
    return ("# dsxfer export\n\n"
            f"Run `{model.cfg.name}` on the base model `{base_model_reference(model.cfg)}`.\n\n"
            "- `trainable.safetensors` + `config.yaml`: load with `dsxfer.method.model.load_trained(this_folder)` "
            "or evaluate with `dsxfer eval --run_dir this_folder`.\n"
            "- `head.safetensors`: the task head alone.\n"
            + ("- `prefixes.safetensors`: per-layer prefix keys/values `prefix.<layer>.key` / `.value`, (kv heads, P, head dim) "
               "each, the reparameterisation MLP evaluated.\n" if model.injection is not None else "")
            + f"\n{peft}\n\n" + "\n".join(f"- {line.replace(str(out) + '/', '')}" for line in lines) + "\n")


def export_run(run_dir: str | Path, output_dir: str | Path | None = None) -> list[str]:
    """`dsxfer export RUN_DIR`: load the trained run and write every export into output_dir."""
    from dsxfer.method.model import CONFIG_FILE, load_trained

    run = Path(run_dir)
    model = load_trained(run)
    out = Path(output_dir) if output_dir else run / "export"
    lines = export_model(model, out, (run / CONFIG_FILE).read_text(encoding="utf-8"))
    from dsxfer.method.trainable import PROMPT_FILE

    for extra in ("shots.json", "test_rows.json", PROMPT_FILE):  # what dsxfer eval --run_dir reads
        if (run / extra).is_file():
            shutil.copy2(run / extra, out / extra)
    (out / "export.json").write_text(json.dumps({"run_dir": str(run), "outputs": lines}, indent=1))
    return lines
