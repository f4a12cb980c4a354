"""How closely PEFT's PREFIX_TUNING reproduces dsxfer's prefixes: max abs difference of the backbone's last
hidden states on the real tokens (fp32), for each way the prefixes could be handed to PEFT.

    OMP_NUM_THREADS=1 .venv/bin/python bench/peft_prefix_fidelity.py                     # embedded model
    OMP_NUM_THREADS=1 .venv/bin/python bench/peft_prefix_fidelity.py --run runs/demo/method  # a trained run
    OMP_NUM_THREADS=1 .venv/bin/python bench/peft_prefix_fidelity.py --tiny bert        # a tiny random model

Without --run, dsxfer prefixes (length 8, MLP-reparameterised, seeded initialisation) are built on the
embedded default model (or a tiny one, 2 layers, prefixes drawn from N(0, 1)) twice: in all layers and
in the top 4 (the demo's layout; top 1 of the tiny model's 2). Rows:
  all layers, plain call         PEFT as loaded, model(input_ids, attention_mask): real tokens at positions P..
  all layers, position_ids - P   the call the exported README.md gives (what dsxfer export writes)
  top layers, zero elsewhere     the nearest PEFT table for prefixes in some layers: zero keys/values in
                                 the other layers (each zero key still takes softmax weight exp(0))
  top layers, keys -M x mean q   keys pointing away from the layer's mean query, M = 1e2 and 1e4: a
                                 query on the other side of the mean gives such a key a large weight
  no prefix at all               plain backbone vs dsxfer: the size of the prefixes' own effect
"""

from __future__ import annotations

import argparse
import sys
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


def _table(merged: dict[str, torch.Tensor], num_layers: int, length: int,
           filler_keys: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """PEFT's (P, L * 2 * H * D) layout; for layers without a dsxfer prefix zero values and zero keys
    (or filler_keys[layer], (H, D) per head)."""
    like = next(iter(merged.values()))
    rows = []
    for layer in range(num_layers):
        for kind in ("key", "value"):
            t = merged.get(f"prefix.{layer}.{kind}")
            if t is None:
                t = torch.zeros_like(like)
                if kind == "key" and filler_keys is not None:
                    t = filler_keys[layer].unsqueeze(1).expand_as(like)
            rows.append(t.permute(1, 0, 2).reshape(length, -1))
    return torch.cat(rows, dim=1)


def _mean_query_directions(backbone, ids, mask) -> dict[int, torch.Tensor]:
    """Per encoder layer the unit mean query of each head over the real tokens, (H, D) (XLM-R / BERT layout)."""
    queries = {}
    layers = backbone.encoder.layer
    hooks = [layer.attention.self.query.register_forward_hook(lambda _m, _a, out, i=i: queries.__setitem__(i, out))
             for i, layer in enumerate(layers)]
    try:
        backbone(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    heads = backbone.config.num_attention_heads
    out = {}
    for i, q in queries.items():
        mean = q[mask.bool()].view(-1, heads, q.shape[-1] // heads).mean(0)
        out[i] = mean / mean.norm(dim=-1, keepdim=True)
    return out


def measure(model, label: str) -> list[tuple[str, float]]:
    from dsxfer.method.backbone import resolve_model_path
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
                directions = _mean_query_directions(peft_model.get_base_model(), ids, mask)
                for scale in (1e2, 1e4):
                    keys = {i: -scale * d for i, d in directions.items()}
                    table = _table(inj.merged(), bb.num_hidden_layers, inj.length, keys)
                    peft_model.prompt_encoder["default"].embedding.weight.copy_(table)
                    away = peft_model(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
                    rows.append((f"{label}: keys -{scale:g} x mean query elsewhere", (away[real] - ours[real]).abs().max().item()))
    rows.append((f"{label}: no prefix at all", (bare[real] - ours[real]).abs().max().item()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run folder (config.yaml + trainable.safetensors)")
    parser.add_argument("--tiny", choices=["xlm-roberta", "bert"], help="a tiny random model instead of the embedded one")
    args = parser.parse_args()
    from dsxfer.config import load_config
    from dsxfer.method.model import build_transfer_model, load_trained

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            model = load_trained(args.run)
            rows += measure(model, f"{Path(args.run).name} (layers {model.injection.layers})")
        else:
            settings = ["prompts.length=0", "injection.length=8", "injection.top_k=4", "alignment.enabled=false", "train.seed=13"]
            if args.tiny:
                sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' model helper
                from tiny import save_tiny_folder, tiny_backbone_and_tokenizer

                save_tiny_folder(tmp, *tiny_backbone_and_tokenizer(args.tiny, seed=0))
                settings += [f"model.name_or_path={tmp}", "injection.top_k=1", "injection.reparam=false"]
            for layers in ("all", "top_k"):
                model = build_transfer_model(load_config(None, settings + [f"injection.layers={layers}"])).eval()
                if args.tiny:
                    with torch.no_grad():
                        for p in model.injection.parameters():
                            p.normal_(0, 1, generator=torch.Generator().manual_seed(0))
                top = model.injection.layers
                where = f"layer {top[0]}" if len(top) == 1 else f"layers {top[0]}-{top[-1]}"
                rows += measure(model, "all layers" if layers == "all" else f"{where} only")
    width = max(len(r) for r, _ in rows)
    print(f"{'prefixes handed to PEFT':<{width}}  max abs diff of last hidden states (real tokens, fp32)")
    for name, value in rows:
        print(f"{name:<{width}}  {value:.3g}")


if __name__ == "__main__":
    main()
