"""Export a trained run: dsxfer's own files plus PEFT adapter folders where a mapping exists.

<export>/trainable.safetensors + config.yaml     what dsxfer.model.load_trained reads (a run folder)
<export>/head.safetensors                        the task head alone (QA: span.weight (2, H), span.bias (2,))
<export>/prefixes.safetensors                    merged per-layer prefixes prefix.<layer>.key / .value (Hkv, P, D)
<export>/peft_prompt_tuning/                     soft prompt  -> PROMPT_TUNING  (prompt_embeddings (n, H))
<export>/peft_lora/                              LoRA         -> LORA
<export>/peft_prefix_tuning/                     prefixes     -> PREFIX_TUNING  (decoders, prefixes in every layer)

Each PEFT folder loads with `peft.PeftModel.from_pretrained(backbone, folder)` on the same backbone and
gives the backbone hidden states dsxfer computes (the PEFT model's outputs include the virtual positions
first; dsxfer's head reads only the real ones). What does not map is skipped with the reason:
- PREFIX_TUNING on encoders (XLM-R, BERT): peft with transformers 5 refuses models without a key/value
  cache ("Model does not support past key values"); keep dsxfer's own files for those.
- PREFIX_TUNING needs a prefix in every layer (peft has no per-layer choice). PEFT counts the prefix
  as P cached positions, so real tokens sit at positions P, P+1, ...; dsxfer keeps them at 0, 1, ...
  For RoPE decoders the exported keys are rotated by +P to compensate (exact for standard rotary
  embeddings; models with partial or scaled-by-position rotary schemes are not covered).
- A run that combines several parts (prompt + prefixes + LoRA) exports each part; only the
  combination of all of them equals dsxfer, and PEFT cannot stack prompt and prefix tuning.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dsxfer.errors import DataError

PROMPT_KEY = "prompt.parts.trainable.embeddings"



def _write_adapter(folder: Path, config, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def prompt_tuning_adapter(model, folder: Path) -> Path:
    """Soft prompt -> PROMPT_TUNING (virtual tokens prepended to inputs_embeds, like dsxfer)."""
    from peft import PromptTuningConfig

    prompt = model.prompt.parts["trainable"].embeddings.detach().float().cpu()
    bb = model.backbone.config
    config = PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=prompt.shape[0], token_dim=bb.hidden_size,
                                num_transformer_submodules=1, num_attention_heads=bb.num_attention_heads,
                                num_layers=bb.num_hidden_layers, base_model_name_or_path=model.cfg.model.name_or_path)
    return _write_adapter(folder, config, {"prompt_embeddings": prompt})


def lora_adapter(model, folder: Path) -> Path:
    """LoRA -> LORA: dsxfer injects peft's own LoRA layers; only the names change (no 'backbone.', no adapter name)."""
    from peft import LoraConfig

    a = model.cfg.adapters
    tensors = {}
    for name, p in model.named_parameters():
        if "lora_" in name and name.startswith("backbone."):
            key = "base_model.model." + name[len("backbone."):].replace(".default.", ".")
            tensors[key] = p.detach().float().cpu()
    config = LoraConfig(task_type="FEATURE_EXTRACTION", r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.target_modules),
                        base_model_name_or_path=model.cfg.model.name_or_path)
    return _write_adapter(folder, config, tensors)


def prefix_tuning_adapter(model, folder: Path) -> Path:
    """Prefixes -> PREFIX_TUNING: one (P, L * 2 * Hkv * D) table, per row the keys then values of each layer."""
    from peft import PrefixTuningConfig

    inj = model.injection
    bb = model.backbone.config
    if sorted(inj.layers) != list(range(bb.num_hidden_layers)):
        raise DataError(f"prefixes are injected in layers {inj.layers} only; PEFT PREFIX_TUNING needs every layer "
                        "(train with injection.layers=all to export it)")
    with torch.no_grad():
        prefixes = inj.forward()  # str(layer) -> (k, v), each (Hkv, P, D)
        rows = []
        for layer in range(bb.num_hidden_layers):
            k, v = prefixes[str(layer)]
            k = _shift_rotary(model.backbone, k, inj.length)
            for t in (k, v):
                rows.append(t.detach().float().cpu().permute(1, 0, 2).reshape(inj.length, -1))  # (P, Hkv * D)
        table = torch.cat(rows, dim=1)
    config = PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=inj.length, token_dim=bb.hidden_size, num_transformer_submodules=1,
                                num_attention_heads=bb.num_attention_heads, num_layers=bb.num_hidden_layers,
                                prefix_projection=False, base_model_name_or_path=model.cfg.model.name_or_path)
    return _write_adapter(folder, config, {"prompt_embeddings": table})


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


def export_model(model, run_dir: Path | None, out: Path, config_yaml: str) -> list[str]:
    """Write every export of an in-memory TransferModel; returns one line per output or skipped mapping."""
    from safetensors.torch import save_file

    from dsxfer.model import is_decoder_backbone

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    state = model.trainable_state_dict()
    save_file(state, str(out / "trainable.safetensors"))
    (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    lines.append(f"wrote {out / 'trainable.safetensors'} ({len(state)} tensors) and {out / 'config.yaml'} (dsxfer.model.load_trained)")
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
        if not is_decoder_backbone(model.backbone):
            lines.append("skipped PEFT PREFIX_TUNING: peft refuses encoder backbones (no past key values in transformers 5); "
                         "the prefixes are in trainable.safetensors")
        else:
            try:
                lines.append(f"wrote {prefix_tuning_adapter(model, out / 'peft_prefix_tuning')} (PEFT PREFIX_TUNING)")
            except DataError as e:
                lines.append(f"skipped PEFT PREFIX_TUNING: {e}")
    return lines


def export_run(run_dir: str | Path, output_dir: str | Path | None = None) -> list[str]:
    """`dsxfer export RUN_DIR`: load the trained run and write every export into output_dir."""
    from dsxfer.model import CONFIG_FILE, load_trained

    run = Path(run_dir)
    model = load_trained(run)
    out = Path(output_dir) if output_dir else run / "export"
    lines = export_model(model, run, out, (run / CONFIG_FILE).read_text(encoding="utf-8"))
    for extra in ("shots.json", "soft_prompt.safetensors"):
        if (run / extra).is_file():
            shutil.copy2(run / extra, out / extra)
    (out / "export.json").write_text(json.dumps({"run_dir": str(run), "outputs": lines}, indent=1))
    return lines
