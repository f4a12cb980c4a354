"""How closely PEFT's PREFIX_TUNING reproduces dsxfer's prefixes: max abs difference of the backbone's last
hidden states on the real tokens (fp32), for each way the prefixes could be handed to PEFT.

    OMP_NUM_THREADS=1 .venv/bin/python bench/peft_prefix_fidelity.py                     # embedded model
    OMP_NUM_THREADS=1 .venv/bin/python bench/peft_prefix_fidelity.py --run runs/demo/method  # a trained run

Without --run, dsxfer prefixes (length 8, MLP-reparameterised, seeded initialisation) are built on the
embedded default model twice: in all 12 layers and in the top 4 (the demo's layout). Rows:
  all layers, plain call         PEFT as loaded, model(input_ids, attention_mask): real tokens at positions P..
  all layers, position_ids - P   the call the exported README.md gives (what dsxfer export writes)
  top layers, zero elsewhere     the nearest PEFT table for prefixes in some layers: zero keys/values in
                                 the other layers (each zero key still takes softmax weight exp(0))
  no prefix at all               plain backbone vs dsxfer: the size of the prefixes' own effect
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

SENTENCES = [
    ("Wo schläft die Katze?", "Die Katze schläft auf der Matte neben dem Ofen, wenn es draußen regnet."),
    ("¿Quién escribió el libro?", "El libro fue escrito por una autora de Sevilla en 1923."),
    ("What is the capital of Norway?", "Oslo is the capital and most populous city of Norway."),
]


def _peft_model(base_path: str, table: torch.Tensor, num_layers: int, heads: int, hidden: int, length: int, folder: Path):
    from peft import PeftModel, PrefixTuningConfig
    from safetensors.torch import save_file
    from transformers import AutoModel

    PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=length, token_dim=hidden, num_transformer_submodules=1,
                       num_attention_heads=heads, num_layers=num_layers, base_model_name_or_path=base_path).save_pretrained(str(folder))
    save_file({"prompt_embeddings": table.contiguous()}, str(folder / "adapter_model.safetensors"))
    return PeftModel.from_pretrained(AutoModel.from_pretrained(base_path), str(folder)).eval()


def _table(merged: dict[str, torch.Tensor], num_layers: int, length: int) -> torch.Tensor:
    """PEFT's (P, L * 2 * H * D) layout; zeros for layers without a dsxfer prefix."""
    like = next(iter(merged.values()))
    rows = []
    for layer in range(num_layers):
        for kind in ("key", "value"):
            t = merged.get(f"prefix.{layer}.{kind}", torch.zeros_like(like))
            rows.append(t.permute(1, 0, 2).reshape(length, -1))
    return torch.cat(rows, dim=1)


def measure(model, label: str) -> list[tuple[str, float]]:
    from dsxfer.backbone import resolve_model_path
    from dsxfer.export import _real_positions_start, base_model_reference

    tok = model.tokenizer
    batch = tok([q for q, _ in SENTENCES], [c for _, c in SENTENCES], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()
    with torch.no_grad():
        out, n = model._encode(ids, mask, None, prompted=True)
        ours = out.last_hidden_state[:, n:]
        bb = model.backbone.config
        inj = model.injection
        base_path = resolve_model_path(base_model_reference(model.cfg))
        with tempfile.TemporaryDirectory() as tmp:
            peft_model = _peft_model(base_path, _table(inj.merged(), bb.num_hidden_layers, inj.length), bb.num_hidden_layers,
                                     bb.num_attention_heads, bb.hidden_size, inj.length, Path(tmp))
            start = _real_positions_start(model.backbone) or 0
            position_ids = (torch.arange(ids.shape[1]) + start - inj.length).expand_as(ids)
            plain = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
            fixed = peft_model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
            bare = peft_model.get_base_model()(input_ids=ids, attention_mask=mask).last_hidden_state
    every = sorted(inj.layers) == list(range(bb.num_hidden_layers))
    rows = []
    if every:
        rows.append((f"{label}: plain call", (plain[real] - ours[real]).abs().max().item()))
        rows.append((f"{label}: position_ids - P", (fixed[real] - ours[real]).abs().max().item()))
    else:
        rows.append((f"{label}: zero keys/values elsewhere, position_ids - P", (fixed[real] - ours[real]).abs().max().item()))
    rows.append((f"{label}: no prefix at all", (bare[real] - ours[real]).abs().max().item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run folder (config.yaml + trainable.safetensors)")
    args = parser.parse_args()
    from dsxfer.config import load_config
    from dsxfer.model import build_transfer_model, load_trained

    rows = []
    if args.run:
        model = load_trained(args.run)
        rows += measure(model, f"{Path(args.run).name} (layers {model.injection.layers})")
    else:
        for layers in ("all", "top_k"):
            cfg = load_config(None, ["prompts.length=0", "injection.length=8", f"injection.layers={layers}", "injection.top_k=4",
                                     "alignment.enabled=false", "train.seed=13"])
            rows += measure(build_transfer_model(cfg).eval(), "all 12 layers" if layers == "all" else "top 4 layers")
    width = max(len(r) for r, _ in rows)
    print(f"{'prefixes handed to PEFT':<{width}}  max abs diff of last hidden states (real tokens, fp32)")
    for name, value in rows:
        print(f"{name:<{width}}  {value:.3g}")


if __name__ == "__main__":
    main()
