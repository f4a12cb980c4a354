"""`dsxfer reproduce`: the method against its peers, as a resumable grid of methods x k shots x seeds x tasks.

    dsxfer reproduce --suite tiny                 # tiny random model, seconds per cell: checks machinery, files, tables
    dsxfer reproduce --suite small --out results/small
    dsxfer report results/small -o results/small/report --markdown docs/RESULTS.md

A cell is one training + evaluation run, in its own subprocess (so a crash ends only that cell and the
peak memory is the cell's own), in <out>/cells/<cell id>/:
  cell.json    what the cell runs (method, its config overrides or peer settings, k, seed, evaluation)
  run/         the dsxfer run folder (config.yaml, train.log, shots.json, ...) or the peer's equivalent
  eval/<task>/ scores.json and predictions of `dsxfer.evaluation.evaluate.run_eval`
  log.txt      the cell's stdout and stderr
  result.json  written last (temporary file + rename): config, seed, k, per-language EM/F1 or accuracy
               with the questions evaluated and the shots excluded, train features/s, peak memory, wall times
A cell whose result.json is complete and was made from the same cell.json is skipped; any other cell
(never started, interrupted, failed, or defined differently since) runs again from scratch: dsxfer's
run folder with train.overwrite=true (its earlier checkpoints are deleted), a peer's folder emptied.

Methods are config overrides of dsxfer (METHODS, kind "dsxfer") or peers built with PEFT's and the HF
Trainer's own API (dsxfer.peers). Suites (SUITES, or a YAML/JSON file of the same shape) are data:
the model, methods, shot counts, seeds, budget and evaluation sets.
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dsxfer.errors import ConfigError, DsxferError

# Tatoeba codes of the target languages (alignment pairs, lexicon induction for pseudo data)
TATOEBA = {"de": "deu", "es": "spa", "zh": "cmn", "ar": "ara", "hi": "hin", "ru": "rus", "vi": "vie", "el": "ell", "tr": "tur",
           "th": "tha", "ro": "ron", "fr": "fra", "ja": "jpn", "ko": "kor"}
MLQA_LANGS = ("es", "de", "ar", "hi", "vi", "zh")  # MLQA dev targets (en is the source)

# --------------------------------------------------------------------------------------- methods
# dsxfer methods are config overrides on top of the suite's budget; every field a config can say stays one.
_NO_EXTRAS = ["prompts.length=0", "injection.length=0", "adapters.lora=false", "alignment.enabled=false", "data.codeswitch_prob=0.0"]
_LORA = ["adapters.lora=true", "adapters.r=8", "adapters.alpha=16", "adapters.target_modules=[query,value]"]
# the knowledge transfer every recipe adds to its lightweight part: InfoNCE alignment and code-switched pseudo data
_TRANSFER = ["alignment.enabled=true", "alignment.loss=infonce", "alignment.weight=0.5", "data.induce_lexicon=true",
             "data.codeswitch_prob=0.3", "data.codeswitch_copies=1"]
_RECIPE = ["prompts.length=16", "injection.length=16", "injection.layers=all", "adapters.lora=false", *_TRANSFER]

METHODS: dict[str, dict[str, Any]] = {
    # peers (dsxfer.peers): PEFT + the HF Trainer, no dsxfer module in the model or the loop
    "peft_lora": {"kind": "peft_lora", "lr": 2e-3, "about": "PEFT LoRA r8 (query, value) + HF Trainer"},
    "peft_prompt": {"kind": "peft_prompt", "lr": 3e-2, "about": "PEFT prompt tuning ({prompt_tokens} virtual tokens, labels shifted) + HF Trainer"},
    "full_ft": {"kind": "full_ft", "lr": 5e-5, "about": "full fine-tuning + HF Trainer"},
    # dsxfer's lightweight parts alone
    "head_only": {"kind": "dsxfer", "lr": 3e-3, "overrides": _NO_EXTRAS, "about": "frozen backbone, QA head only"},
    "prefix_topk": {"kind": "dsxfer", "lr": 3e-3, "overrides": _NO_EXTRAS + ["injection.length=16", "injection.layers=top_k",
                                                                               "injection.top_k=4"],
                    "about": "prefixes 16 in the top 4 layers"},
    "prefix_all": {"kind": "dsxfer", "lr": 3e-3, "overrides": _NO_EXTRAS + ["injection.length=16", "injection.layers=all"],
                   "about": "prefixes 16 in all layers"},
    "soft_prompt": {"kind": "dsxfer", "lr": 3e-3, "overrides": _NO_EXTRAS + ["prompts.length=16"], "about": "soft prompt 16"},
    "dsxfer_lora": {"kind": "dsxfer", "lr": 2e-3, "overrides": _NO_EXTRAS + _LORA, "about": "dsxfer LoRA r8 (query, value), no alignment"},
    # the recipe: lightweight part + knowledge transfer (alignment, code-switched pseudo data)
    "recipe": {"kind": "dsxfer", "lr": 3e-3, "overrides": _RECIPE,
               "about": "soft prompt 16 + prefixes 16 in all layers + InfoNCE alignment 0.5 + code-switched pseudo data"},
    "lora_recipe": {"kind": "dsxfer", "lr": 2e-3, "overrides": _NO_EXTRAS + _LORA + _TRANSFER,
                    "about": "dsxfer LoRA r8 + InfoNCE alignment 0.5 + code-switched pseudo data"},
    # the same knowledge transfer on top of the lightest part: a soft prompt of PEFT's size (20) at the lr the
    # source dev tuning found best for prompt tuning (0.1; docs/results/tune), the part whose score moved least with the seed
    "prompt_recipe": {"kind": "dsxfer", "lr": 1e-1, "overrides": _NO_EXTRAS + ["prompts.length=20", *_TRANSFER],
                      "about": "dsxfer soft prompt 20 (lr 0.1) + InfoNCE alignment 0.5 + code-switched pseudo data"},
    # ablations of the recipe: one part removed or one alignment form swapped
    "recipe_no_alignment": {"kind": "dsxfer", "lr": 3e-3, "overrides": _RECIPE + ["alignment.enabled=false"],
                            "ablation_of": "recipe", "change": "without alignment"},
    "recipe_no_injection": {"kind": "dsxfer", "lr": 3e-3, "overrides": _RECIPE + ["injection.length=0"],
                            "ablation_of": "recipe", "change": "without injection (prefixes)"},
    "recipe_no_pseudo": {"kind": "dsxfer", "lr": 3e-3, "overrides": _RECIPE + ["data.codeswitch_prob=0.0", "data.induce_lexicon=false"],
                         "ablation_of": "recipe", "change": "without pseudo data"},
    "recipe_cosine": {"kind": "dsxfer", "lr": 3e-3, "overrides": _RECIPE + ["alignment.loss=cosine"],
                      "ablation_of": "recipe", "change": "alignment form cosine"},
    "recipe_mse": {"kind": "dsxfer", "lr": 3e-3, "overrides": _RECIPE + ["alignment.loss=mse"],
                   "ablation_of": "recipe", "change": "alignment form mse"},
    "recipe_kl": {"kind": "dsxfer", "lr": 3e-3, "overrides": _RECIPE + ["alignment.loss=kl"],
                  "ablation_of": "recipe", "change": "alignment form kl"},
}
for _base in ("lora_recipe", "prompt_recipe"):  # each transfer part removed from the recipes on LoRA and on a soft prompt
    for _suffix, _change, _off in (("no_alignment", "without alignment", ["alignment.enabled=false"]),
                                   ("no_pseudo", "without pseudo data", ["data.codeswitch_prob=0.0", "data.induce_lexicon=false"])):
        METHODS[f"{_base}_{_suffix}"] = {"kind": "dsxfer", "lr": METHODS[_base]["lr"], "ablation_of": _base, "change": _change,
                                         "overrides": METHODS[_base]["overrides"] + _off}
for _name, _m in METHODS.items():  # an ablation is described by what it changes in the method it ablates
    _m.setdefault("about", f"{METHODS[_m['ablation_of']]['about']}, {_m['change']}" if "ablation_of" in _m else _name)
    _m.setdefault("overrides", [])

# ----------------------------------------------------------------------------------------- suites
# A suite is data: the model, the grid, the budget of one cell and the evaluation sets.
#   model      "embedded" (the embedded default), "tiny" (a random 4-layer XLM-R built here), or a folder
#   targets    target languages (k shots from MLQA dev where MLQA has them, alignment pairs from Tatoeba)
#   train      the budget: source questions, windows, steps, batch, warm-up fraction, source dev hold-out
#   eval       {task: {langs, max_examples}}: XQuAD and MLQA dev per language (the source en shown apart)
#   pawsx      optional: the PAWS-X row-split task for the dsxfer methods listed (peers are QA only)
SUITES: dict[str, dict[str, Any]] = {
    "tiny": {
        "about": "tiny random model: checks the machinery, files and tables, never quality",
        "model": "tiny", "methods": ["dsxfer_lora", "peft_prompt"], "k": [4], "seeds": [1, 2], "targets": ["de", "es"],
        "train": {"questions": 40, "dev_examples": 8, "max_length": 128, "stride": 32, "steps": 4, "batch": 4, "warmup": 0.25,
                  "alignment_pairs": 32},
        "eval": {"xquad": {"langs": ["en", "de", "es"], "max_examples": 10}, "mlqa": {"langs": ["en", "de", "es"], "max_examples": 10}},
        "prompt_tokens": 4,
    },
    "small": {
        "about": "embedded model, 36 cells, 3-4.5 hours on 2 quiet CPU cores, about half of it evaluation (README: how it was sized)",
        "model": "embedded", "methods": ["peft_lora", "peft_prompt", "peft_prompt_lr1e-1", "dsxfer_lora", "lora_recipe", "prompt_recipe"],
        # PEFT prompt tuning at the lr the source dev tuning found best (docs/results/tune), beside its shipped 3e-2
        "define": {"peft_prompt_lr1e-1": {"like": "peft_prompt", "lr": 0.1}},
        "k": [0, 32], "seeds": [1, 2, 3], "targets": ["de", "es", "zh"],
        "train": {"questions": 600, "dev_examples": 30, "max_length": 128, "stride": 32, "steps": 100, "batch": 8, "warmup": 0.1,
                  "alignment_pairs": 200},
        # evaluation is most of a cell's time (1800 questions, about 85k tokens per 300): the floor,
        # targets only (the source is measured on its dev hold-out during training)
        "eval": {"xquad": {"langs": ["de", "es", "zh"], "max_examples": 300},
                 "mlqa": {"langs": ["de", "es", "zh"], "max_examples": 300}},
        "prompt_tokens": 20,
    },
    "probe": {
        "about": "one short cell per method of the small suite (8 steps, 40 questions of de per dataset): the per-cell times small is sized from",
        "model": "embedded", "methods": ["dsxfer_lora", "lora_recipe", "peft_lora", "peft_prompt"], "k": [32], "seeds": [1],
        "targets": ["de", "es", "zh"],
        "train": {"questions": 300, "dev_examples": 30, "max_length": 128, "stride": 32, "steps": 8, "batch": 8, "warmup": 0.1,
                  "alignment_pairs": 200},
        "eval": {"xquad": {"langs": ["de"], "max_examples": 40}, "mlqa": {"langs": ["de"], "max_examples": 40}},
        "prompt_tokens": 20,
    },
    "full": {
        "about": "every method and k, 5 seeds: sized for one GPU, or a long CPU run",
        "model": "embedded", "methods": list(METHODS), "k": [0, 8, 32, 128], "seeds": [1, 2, 3, 4, 5],
        "targets": ["de", "es", "zh", "ar", "hi", "ru"],
        "train": {"questions": 1000, "dev_examples": 200, "max_length": 256, "stride": 64, "steps": 284, "batch": 8, "warmup": 0.1,
                  "alignment_pairs": 1000},
        "eval": {"xquad": {"langs": ["en", "de", "es", "zh", "ar", "hi", "ru"], "max_examples": None},
                 "mlqa": {"langs": ["en", "de", "es", "zh", "ar", "hi"], "max_examples": None}},
        "pawsx": {"methods": ["head_only", "prefix_all", "dsxfer_lora", "recipe_no_pseudo"], "langs": ["en", "de", "es", "zh", "fr", "ja", "ko"],
                  "steps": 300, "max_length": 128},
        "prompt_tokens": 20,
    },
}

# evaluation sets a suite's eval can name: the target benchmarks, and the run's own source dev hold-out (for tuning:
# data.dev_examples source questions never trained on; the only data a recipe may be tuned on)
EVAL_TASKS = ("xquad", "mlqa", "source_dev")
RESULT_KEYS = ("cell", "spec", "config", "method", "kind", "task", "k", "seed", "scores", "train", "peak_rss_mb", "wall_s")


def load_suite(name_or_path: str) -> dict[str, Any]:
    """A suite by name (SUITES) or from a YAML/JSON file of the same shape; every method and field is checked."""
    if name_or_path in SUITES:
        suite = copy.deepcopy(SUITES[name_or_path])
        suite["name"] = name_or_path
    else:
        path = Path(name_or_path)
        if path.suffix not in (".yaml", ".yml", ".json") or not path.is_file():
            raise ConfigError(f"reproduce: unknown suite '{name_or_path}': choose one of {', '.join(SUITES)} or give a .yaml/.json suite file")
        import yaml

        suite = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(suite, dict):
            raise ConfigError(f"{path}: a suite file holds a mapping (model, methods, k, seeds, targets, train, eval)")
        suite.setdefault("name", path.stem)
    for key in ("model", "methods", "k", "seeds", "targets", "train", "eval"):
        if key not in suite:
            raise ConfigError(f"suite {suite['name']}: field '{key}' is missing (see dsxfer/reproduce.py SUITES for the shape)")
    suite["define"] = _defined_methods(suite)
    known = suite_methods(suite)
    unknown = [m for m in suite["methods"] + suite.get("pawsx", {}).get("methods", []) if m not in known]
    if unknown:
        raise ConfigError(f"suite {suite['name']}: unknown method '{unknown[0]}': choose from {', '.join(known)}, "
                          "or define it in the suite's 'define'")
    for task, ev in suite["eval"].items():
        if task not in EVAL_TASKS:
            raise ConfigError(f"suite {suite['name']}: eval: unknown evaluation set '{task}': choose from {', '.join(EVAL_TASKS)}")
    if "source_dev" in suite["eval"] and not suite["train"].get("dev_examples"):
        raise ConfigError(f"suite {suite['name']}: eval.source_dev scores the source dev hold-out, but train.dev_examples is 0: "
                          "set it to the number of source questions to hold out")
    suite.setdefault("prompt_tokens", 20)
    return suite


def suite_methods(suite: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The methods a suite can name: METHODS and the variants its 'define' adds."""
    return {**METHODS, **suite.get("define", {})}


_VARIANT_KEYS = ("like", "overrides", "lr", "about")


def _defined_methods(suite: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A suite's own methods: `define: {name: {like: <method>, overrides: [key=value, ...], lr: <float>, about: <text>}}`,
    each a variant of a method (its overrides appended, or another learning rate), e.g. the tuning grid of a recipe.
    A variant is reported as an ablation of the method it is like ('change' says what differs)."""
    from dsxfer.config import load_config

    name, defined = suite["name"], suite.get("define") or {}
    if not isinstance(defined, dict):
        raise ConfigError(f"suite {name}: 'define' maps method names to {{like, overrides, lr, about}}, not a {type(defined).__name__}")
    out = {}
    for method, d in defined.items():
        where = f"suite {name}: define.{method}"
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(method)):
            raise ConfigError(f"{where}: a method name is letters, digits and _ . + - only (it names the cell folders)")
        if method in METHODS:
            raise ConfigError(f"{where}: '{method}' is a built-in method; give the variant a name of its own")
        if not isinstance(d, dict) or d.get("like") not in METHODS:
            raise ConfigError(f"{where}: field 'like' names the method it varies: one of {', '.join(METHODS)}")
        extra = [k for k in d if k not in _VARIANT_KEYS]
        if extra:
            raise ConfigError(f"{where}: unknown field '{extra[0]}': a variant has {', '.join(_VARIANT_KEYS)}")
        base, overrides = METHODS[d["like"]], d.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ConfigError(f"{where}: 'overrides' is a list of key=value config overrides, e.g. [alignment.weight=0.25]")
        if overrides and base["kind"] != "dsxfer":
            raise ConfigError(f"{where}: {d['like']} is a peer (PEFT + the HF Trainer): a variant of it can change its lr only")
        try:
            lr = float(d.get("lr", base["lr"]))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: lr {d.get('lr')!r} is not a number") from None
        if overrides:
            load_config(None, list(base["overrides"]) + overrides)  # a bad key or value fails here, named by the config loader
        change = ", ".join(([f"lr {lr:g}"] if "lr" in d else []) + overrides) or "(the same settings)"
        out[method] = {"kind": base["kind"], "lr": lr, "overrides": list(base["overrides"]) + overrides, "ablation_of": d["like"],
                       "change": change, "about": str(d.get("about") or f"{base['about']}, {change}")}
    return out


# ------------------------------------------------------------------------------------------- cells


def _qa_overrides(suite: dict[str, Any], method: str, k: int, seed: int) -> list[str]:
    """The dsxfer config of a QA cell: the suite's budget and data, then the method's own overrides."""
    t, targets, methods = suite["train"], suite["targets"], suite_methods(suite)
    shot_langs = [lang for lang in targets if lang in MLQA_LANGS]
    steps = t["steps"]
    out = [f"name={method}", f"model.max_length={t['max_length']}", f"model.doc_stride={t['stride']}",
           "data.train_task=tydiqa", "data.source_lang=en", f"data.max_train_examples={t['questions']}",
           f"data.dev_examples={t['dev_examples']}", "data.shot_task=mlqa", f"data.target_langs=[{','.join(shot_langs)}]",
           f"data.k_shot={k}", f"alignment.target_langs=[{','.join(TATOEBA[lang] for lang in targets if lang in TATOEBA)}]",
           f"alignment.max_pairs={t['alignment_pairs']}", f"alignment.batch_size={t['batch']}",
           f"alignment.max_length={min(64, t['max_length'])}",
           # the training config's eval sets only guard the k shots (never drawn from them) and the overlap check:
           # XQuAD is checked against the training pool; MLQA dev is where the shots come from, so the shots are
           # left out of its evaluation afterwards (dsxfer eval --run_dir, shots.json) instead
           "eval.tasks=[xquad]", f"eval.langs=[{','.join(suite['eval'].get('xquad', {}).get('langs', ['en']))}]",
           f"train.max_steps={steps}", f"train.warmup_steps={max(0, round(t['warmup'] * steps))}", "train.scheduler=linear",
           f"train.micro_batch_size={t['batch']}", "train.grad_accum=1", f"train.log_every={max(1, steps // 10)}",
           "train.eval_every=0", "train.save_every=0", "train.keep_last=1", f"train.seed={seed}", "train.tensorboard=false",
           "train.overwrite=true", f"train.lr={methods[method]['lr']}"]
    return out + list(methods[method]["overrides"]) + list(suite.get("overrides", []))


def _pawsx_overrides(suite: dict[str, Any], method: str, k: int, seed: int) -> list[str]:
    p, t = suite["pawsx"], suite["train"]
    targets = [lang for lang in p["langs"] if lang != "en"]
    out = _qa_overrides(suite, method, k, seed)
    return out + ["model.task=classification", "model.num_labels=2", f"model.max_length={p['max_length']}", "model.doc_stride=0",
                  "data.train_task=pawsx", "data.shot_task=pawsx", f"data.target_langs=[{','.join(targets)}]", "data.max_train_examples=null",
                  "eval.tasks=[pawsx]", f"eval.langs=[{','.join(p['langs'])}]", f"train.max_steps={p['steps']}",
                  f"train.warmup_steps={max(0, round(t['warmup'] * p['steps']))}",
                  f"alignment.target_langs=[{','.join(TATOEBA[lang] for lang in targets if lang in TATOEBA)}]",
                  "data.codeswitch_prob=0.0", "data.induce_lexicon=false"]


def grid_cells(suite: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cell of the suite, in the order they run: per seed, then k, then method (so a stopped grid has
    whole seeds of every method rather than every seed of a few methods)."""
    cells, methods_of = [], suite_methods(suite)
    tasks = [("qa", suite["methods"])] + ([("pawsx", suite["pawsx"]["methods"])] if suite.get("pawsx") else [])
    for seed in suite["seeds"]:
        for k in suite["k"]:
            for task, methods in tasks:
                for method in methods:
                    kind = methods_of[method]["kind"]
                    if task == "pawsx" and kind != "dsxfer":
                        continue  # the peers are QA models
                    cell_id = f"{task}-{method}-k{k}-s{seed}"
                    if task == "qa":
                        evals = {name: dict(spec) for name, spec in suite["eval"].items()}
                        config, steps = _qa_overrides(suite, method, k, seed), suite["train"]["steps"]
                    else:
                        evals = {"pawsx": {"langs": suite["pawsx"]["langs"], "max_examples": None}}
                        config, steps = _pawsx_overrides(suite, method, k, seed), suite["pawsx"]["steps"]
                    cells.append({"cell": cell_id, "task": task, "method": method, "kind": kind, "k": k, "seed": seed,
                                  "lr": methods_of[method]["lr"], "about": methods_of[method]["about"].format(prompt_tokens=suite["prompt_tokens"]),
                                  "ablation_of": methods_of[method].get("ablation_of"), "change": methods_of[method].get("change"),
                                  "steps": steps, "prompt_tokens": suite["prompt_tokens"], "eval": evals, "suite": suite["name"],
                                  # the cell's whole dsxfer config (for a peer: the data and budget it shares with dsxfer)
                                  "config": config})
    return cells


def finished_result(cell_dir: Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The cell's result when it is complete and made from this very spec, else None (the cell runs again)."""
    path = cell_dir / "result.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or any(k not in doc for k in RESULT_KEYS) or doc["spec"] != spec:
        return None
    return doc


# ----------------------------------------------------------------------------------------- models


def build_tiny_model(folder: Path, data_dir: str | None = None) -> Path:
    """A random 4-layer XLM-R (hidden 32) with a 1000-piece Unigram tokenizer trained here on Tatoeba lines:
    no download; what the tiny suite trains. Rebuilt only when the folder is incomplete."""
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel

    from dsxfer.data.tasks import tatoeba_files

    lines: list[str] = []
    for lang in ("deu", "spa", "cmn"):
        for path in tatoeba_files(lang, data_dir):
            if path.is_file():
                with open(path, encoding="utf-8") as f:
                    lines += [line.rstrip("\n") for _, line in zip(range(300), f)]
    if not lines:
        raise DsxferError("the tiny model's tokenizer is trained on Tatoeba lines, and none were found: set $DSXFER_DATA to the data folder")
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.train_from_iterator(lines, trainer=trainers.UnigramTrainer(vocab_size=1000, special_tokens=specials, unk_token="<unk>",
                                                                  show_progress=False))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", bos), ("</s>", eos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=514, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=bos, eos_token_id=eos)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = XLMRobertaModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _model_path(suite: dict[str, Any], out: Path, override: str | None) -> str | None:
    """The model folder cells load (None = the embedded default, resolved by dsxfer itself)."""
    choice = override or suite["model"]
    if choice == "embedded":
        return None
    if choice == "tiny":
        return str(build_tiny_model(out / "tiny-model").resolve())
    if not Path(choice).is_dir():
        raise ConfigError(f"reproduce: model folder {choice} does not exist: give an HF model folder, 'embedded' or 'tiny'")
    return str(Path(choice).resolve())


# --------------------------------------------------------------------------------------- the grid


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


_STEP = re.compile(r"^step (\d+) ", re.M)


def _cell_progress(cell_dir: Path) -> tuple[int, str]:
    """(optimizer steps done, phase) of a running cell, from its run's train.log or the peer's step file."""
    phase_file = cell_dir / "phase.txt"
    phase = (phase_file.read_text(encoding="utf-8").strip() if phase_file.is_file() else "") or "starting"
    step = 0
    log = cell_dir / "run" / "train.log"
    if log.is_file():
        found = _STEP.findall(log.read_text(encoding="utf-8", errors="replace"))
        step = int(found[-1]) if found else 0
    steps_file = cell_dir / "run" / "peer_step.txt"
    if steps_file.is_file():
        hit = re.match(r"step (\d+)", steps_file.read_text(encoding="utf-8"))
        step = int(hit.group(1)) if hit else step
    return step, phase


def _child_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # dsxfer and the Trainer both take a visible GPU: hide it for a CPU grid
    return env


def run_grid(suite_name: str, out_dir: str | Path, *, device: str = "cpu", model: str | None = None, methods: list[str] | None = None,
             dry_run: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run (or continue) every cell of a suite into out_dir; returns {ran, skipped, failed, cells, wall_s}."""
    from tqdm.auto import tqdm

    suite = load_suite(suite_name)
    if methods:
        unknown = [m for m in methods if m not in suite["methods"]]
        if unknown:
            raise ConfigError(f"reproduce: --methods: '{unknown[0]}' is not a method of suite {suite['name']} ({', '.join(suite['methods'])})")
        suite["methods"] = [m for m in suite["methods"] if m in methods]
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise DsxferError("reproduce: --device cuda, but torch sees no CUDA GPU here; use --device cpu")
    out = Path(out_dir)
    cells = grid_cells(suite)
    todo, skipped = [], []
    durations: dict[str, list[float]] = {}  # seconds per finished cell, by method: the ETAs (earlier cells count too)
    for spec in cells:
        done = finished_result(out / "cells" / spec["cell"], spec)
        (skipped if done else todo).append(spec)
        if done:
            durations.setdefault(spec["method"], []).append(float(done["wall_s"]))
    say = (lambda *_: None) if quiet else (lambda text: print(text, flush=True))
    say(f"suite {suite['name']}: {len(cells)} cells ({len(suite['methods'])} methods x k {suite['k']} x seeds {suite['seeds']}"
        + (f" + PAWS-X {len(suite['pawsx']['methods'])} methods" if suite.get("pawsx") else "")
        + f"); {len(skipped)} finished earlier (skipped), {len(todo)} to run; device {device}; results in {out}")
    if dry_run:  # nothing is written
        for spec in todo:
            say(f"  would run {spec['cell']}")
        return {"ran": [], "skipped": [s["cell"] for s in skipped], "failed": [], "cells": [c["cell"] for c in cells], "wall_s": 0.0}
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DsxferError(f"reproduce: cannot write the results folder {out}: {e.strerror or e}; choose another --out") from None
    lock = _lock_results(out)  # held until this process ends: two grids on one folder would redo each other's cells
    model_path = _model_path(suite, out, model)
    grid = {"suite": suite, "model_path": model_path, "device": device, "cells": [c["cell"] for c in cells],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "grid.json").write_text(json.dumps(grid, indent=1), encoding="utf-8")
    t0 = time.perf_counter()
    ran, failed = [], []
    grid_bar = tqdm(total=len(todo), desc="grid", unit="cell", disable=quiet or not sys.stderr.isatty(), position=0, dynamic_ncols=True)
    for spec in todo:
        cell_dir = out / "cells" / spec["cell"]
        started = time.perf_counter()
        rc = _run_cell_process(spec, cell_dir, model_path, device, durations, quiet)
        took = time.perf_counter() - started
        if rc == 0 and finished_result(cell_dir, spec):
            durations.setdefault(spec["method"], []).append(took)
            ran.append(spec["cell"])
            status = f"done in {_fmt_s(took)}"
        else:
            failed.append(spec["cell"])
            tail = (cell_dir / "log.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] if (cell_dir / "log.txt").is_file() else []
            status = f"FAILED (exit {rc}): {tail[0] if tail else 'no log'}; log: {cell_dir / 'log.txt'}"
        grid_bar.update(1)
        left = todo[todo.index(spec) + 1:]
        eta = sum(_estimate(durations, s["method"]) for s in left)
        grid_bar.set_postfix_str(f"grid ETA {_fmt_s(eta)}")
        tqdm.write(f"cell {spec['cell']}: {status}; {len(left)} left, grid ETA {_fmt_s(eta)}") if not quiet else None
    grid_bar.close()
    os.close(lock)
    wall = time.perf_counter() - t0
    say(f"suite {suite['name']}: ran {len(ran)}, skipped {len(skipped)} (finished earlier), failed {len(failed)} in {_fmt_s(wall)}"
        + (f"; failed cells: {', '.join(failed)} (run again to retry them)" if failed else "")
        + f"\nnext: dsxfer report {out}")
    return {"ran": ran, "skipped": [s["cell"] for s in skipped], "failed": failed, "cells": [c["cell"] for c in cells], "wall_s": wall}


def _lock_results(out: Path) -> int:
    """An exclusive flock on <out>/.reproduce.lock (released by the kernel when the process ends, however it ends)."""
    import fcntl

    path = out / ".reproduce.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = path.read_text(encoding="utf-8").strip() or "another process"
        os.close(fd)
        raise DsxferError(f"reproduce: results folder {out} is in use by {holder}: wait for that grid to end, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
    return fd


def _estimate(durations: dict[str, list[float]], method: str) -> float:
    """Seconds a cell of this method will take: the mean of its finished cells, else of all finished cells."""
    mine = durations.get(method) or [d for ds in durations.values() for d in ds]
    return sum(mine) / len(mine) if mine else 0.0


def _run_cell_process(spec: dict[str, Any], cell_dir: Path, model_path: str | None, device: str,
                      durations: dict[str, list[float]], quiet: bool) -> int:
    """Start the cell in a fresh interpreter; show its steps and ETA while it runs; returns the exit code."""
    from tqdm.auto import tqdm

    if cell_dir.exists():
        shutil.rmtree(cell_dir)  # an interrupted or stale cell starts from nothing
    cell_dir.mkdir(parents=True)
    (cell_dir / "cell.json").write_text(json.dumps({"spec": spec, "model_path": model_path, "device": device}, indent=1), encoding="utf-8")
    steps = spec["steps"]
    guess = _estimate(durations, spec["method"])
    # a terminal gets a live bar per cell (steps, phase, ETA); a log file gets one line per phase change
    live = not quiet and sys.stderr.isatty()
    bar = tqdm(total=steps, desc=spec["cell"], unit="step", disable=not live, position=1, leave=False, dynamic_ncols=True)
    shown = None
    with open(cell_dir / "log.txt", "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dsxfer.reproduce", "--cell", str(cell_dir)], stdout=log, stderr=subprocess.STDOUT,
                                env=_child_env(device))
        started = time.perf_counter()
        while proc.poll() is None:
            time.sleep(0.5)
            step, phase = _cell_progress(cell_dir)
            elapsed = time.perf_counter() - started
            left = f"cell ETA {_fmt_s(max(0.0, guess - elapsed))}" if guess else "no ETA before the first cell of its method ends"
            if step > bar.n:
                bar.update(step - bar.n)
            if live:
                bar.set_postfix_str(f"{phase}; {left}")
            elif not quiet and phase != shown:
                tqdm.write(f"cell {spec['cell']}: {phase} ({_fmt_s(elapsed)} in; {left})")
            shown = phase
    bar.close()
    return proc.returncode


# --------------------------------------------------------------------------------------- one cell


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _phase(cell_dir: Path, text: str) -> None:
    (cell_dir / "phase.txt").write_text(text + "\n", encoding="utf-8")


def _dsxfer_features_per_s(run_dir: Path) -> float | None:
    """Training features (windows) per second from train.log's step lines: each line reports the samples/s of
    the steps since the previous line (equal-sized windows), so the rate over the run is their harmonic mean."""
    rates = [float(x) for x in re.findall(r"\| ([0-9.]+) samples/s", (run_dir / "train.log").read_text(encoding="utf-8"))]
    rates = [r for r in rates if r > 0]
    return len(rates) / sum(1 / r for r in rates) if rates else None


def _evaluate(spec: dict[str, Any], cfg, run_dir: Path, cell_dir: Path, predictor=None) -> dict[str, Any]:
    """run_eval on every evaluation set of the cell; the rows the run trained on (its shots) are left out and counted."""
    from dsxfer.evaluation.evaluate import run_eval

    scores = {}
    for task, ev in spec["eval"].items():
        if task == "source_dev":
            scores[task] = _source_dev_scores(cfg, run_dir, cell_dir / "eval" / task, predictor, ev.get("max_examples"))
            continue
        doc = run_eval(task, ev["langs"], run_dir=str(run_dir), predictor=predictor, max_examples=ev.get("max_examples"),
                       output_dir=cell_dir / "eval" / task, batch_size=32, seed=0, progress=False)
        per_lang = {}
        for r in doc["results"]:
            kept = {k: r[k] for k in ("f1", "exact_match", "accuracy", "majority_accuracy", "n_examples", "data") if k in r}
            kept["excluded"] = r.get("excluded", {}).get("count", 0) if isinstance(r.get("excluded"), dict) else 0
            per_lang[r["lang"]] = kept
        scores[task] = per_lang
    return scores


def _source_dev_scores(cfg, run_dir: Path, out_dir: Path, predictor, max_examples: int | None) -> dict[str, Any]:
    """EM/F1 on the run's source dev hold-out (source_dev_ids.json: source questions it never trained on), drawn
    again by the code that drew it for training and checked against the run's record; predictions and scores.json
    go to out_dir like run_eval's. A dsxfer run scored the whole hold-out at its kept step (<run>/source_dev/):
    those files are taken as they are rather than scored a second time."""
    from dsxfer.data.build import training_rows
    from dsxfer.evaluation.evaluate import SOURCE_DEV_DIR, evaluate_qa, load_predictor, write_source_dev

    recorded = json.loads((run_dir / "source_dev_ids.json").read_text(encoding="utf-8"))
    dev = sorted(training_rows(cfg).dev, key=lambda ex: ex.id)
    if sorted({ex.id for ex in dev}) != sorted(set(recorded)):
        raise DsxferError(f"{run_dir / 'source_dev_ids.json'}: the run held out other source questions than the config draws now "
                          "(was the data folder changed?); run the cell again")
    if max_examples is not None:
        dev = dev[:max_examples]
    lang, trained = cfg.data.source_lang, run_dir / SOURCE_DEV_DIR
    written = json.loads((trained / "scores.json").read_text(encoding="utf-8")) if (trained / "scores.json").is_file() else None
    if written is not None and written["results"][0]["n_examples"] == len(dev) == len(recorded):
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("scores.json", written["results"][0]["predictions"]):
            shutil.copyfile(trained / name, out_dir / name)
        result = written["results"][0]
    else:
        predictor = predictor or load_predictor("qa", run_dir=str(run_dir))
        preds, scores = evaluate_qa(predictor.predict, predictor.tokenizer, dev, lang=lang, metric="squad", max_length=cfg.model.max_length,
                                    doc_stride=cfg.model.doc_stride, reserved_tokens=predictor.reserved_tokens, batch_size=32, progress=False)
        result = write_source_dev(out_dir, cfg, dev, preds, scores, method=predictor.method, run_dir=str(run_dir))
    return {lang: {**{k: result[k] for k in ("f1", "exact_match", "n_examples", "data")}, "excluded": 0}}


def run_cell(cell_dir: Path) -> dict[str, Any]:
    """The child: train and evaluate one cell as its cell.json says, then write result.json atomically."""
    t0 = time.perf_counter()
    doc = json.loads((cell_dir / "cell.json").read_text(encoding="utf-8"))
    spec, model_path, device = doc["spec"], doc["model_path"], doc["device"]
    run_dir = cell_dir / "run"
    import torch

    from dsxfer.config import load_config

    where = [f"train.output_dir={run_dir}"] + ([f"model.name_or_path={model_path}"] if model_path else [])
    cfg = load_config(None, spec["config"] + where)
    _phase(cell_dir, "training")
    if spec["kind"] == "dsxfer":
        from dsxfer.training.train import train

        t = time.perf_counter()
        summary = train(cfg, quiet=True)
        train_s = time.perf_counter() - t
        trained = {"steps": summary["step"], "features": summary.get("task_features"), "features_per_s": _dsxfer_features_per_s(run_dir),
                   "train_s": train_s, "stopped": summary["stopped"]}
        _phase(cell_dir, "evaluating")
        t = time.perf_counter()
        scores = _evaluate(spec, cfg, run_dir, cell_dir)
        trained["eval_s"] = time.perf_counter() - t
        config = cfg.to_dict()
    else:
        scores, trained, config = _run_peer(spec, cfg, model_path, device, run_dir, cell_dir)
    result = {"cell": spec["cell"], "spec": spec, "config": config, "method": spec["method"], "kind": spec["kind"], "task": spec["task"],
              "k": spec["k"], "seed": spec["seed"], "source_lang": cfg.data.source_lang, "scores": scores, "train": trained,
              "eval_s": trained.pop("eval_s"), "peak_rss_mb": _peak_rss_mb(), "wall_s": time.perf_counter() - t0, "device": device,
              "torch_threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    tmp = cell_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    tmp.replace(cell_dir / "result.json")  # a result is there whole or not at all
    _phase(cell_dir, "done")
    return result


def _run_peer(spec: dict[str, Any], cfg, model_path: str | None, device: str, run_dir: Path, cell_dir: Path):
    """A peer cell: the same rows as dsxfer's run of this cell (dsxfer.peers.training_rows), PEFT + Trainer, the same scorer."""
    from dsxfer.data.sampling import save_shots
    from dsxfer.method.backbone import resolve_model_path
    from dsxfer.peers import peer_predictor, train_peer, training_rows

    path = model_path or resolve_model_path(None)
    rows = training_rows(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    # the same record files a dsxfer run writes: run_eval leaves these rows out of the same task's evaluation
    save_shots(run_dir / "shots.json", rows["shots"], task=cfg.data.shot_task, k=cfg.data.k_shot, seed=cfg.train.seed)
    (run_dir / "train_rows.json").write_text(json.dumps({"task": cfg.data.train_task, "ids": sorted({ex.id for ex in rows["pool"]})}))
    (run_dir / "source_dev_ids.json").write_text(json.dumps([ex.id for ex in rows["dev"]]))
    examples = rows["pool"] + [ex for exs in rows["shots"].values() for ex in exs]
    peer = train_peer(spec["kind"], path, examples, out_dir=run_dir / "trainer", seed=spec["seed"], max_length=cfg.model.max_length,
                      stride=cfg.model.doc_stride, steps=cfg.train.max_steps, batch_size=cfg.train.micro_batch_size, lr=spec["lr"],
                      warmup_steps=cfg.train.warmup_steps, use_cpu=device == "cpu", progress_file=run_dir / "peer_step.txt",
                      prompt_tokens=spec["prompt_tokens"])
    _phase(cell_dir, "evaluating")
    predictor = peer_predictor(peer["model"], peer["tokenizer"], peer["n_virtual"], name=spec["method"], model_name=path,
                               max_length=cfg.model.max_length, doc_stride=cfg.model.doc_stride)
    t = time.perf_counter()
    scores = _evaluate(spec, cfg, run_dir, cell_dir, predictor)
    eval_s = time.perf_counter() - t
    trained = {"eval_s": eval_s, "steps": peer["steps"], "features": peer["windows"], "features_per_s": peer["features_per_s"], "train_s": peer["train_s"],
               "trainable_params": peer["trainable_params"]}
    config = {"peer": spec["kind"], "model": path, "lr": spec["lr"], "steps": cfg.train.max_steps, "batch": cfg.train.micro_batch_size,
              "warmup_steps": cfg.train.warmup_steps, "max_length": cfg.model.max_length, "doc_stride": cfg.model.doc_stride,
              "prompt_tokens": spec["prompt_tokens"] if spec["kind"] == "peft_prompt" else 0,
              "data": {k: v for k, v in cfg.to_dict()["data"].items()}, "seed": spec["seed"]}
    return scores, trained, config


def _child_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--cell":
        print("usage: python -m dsxfer.reproduce --cell CELL_DIR (started by dsxfer reproduce)", file=sys.stderr)
        return 2
    try:
        run_cell(Path(argv[1]))
    except DsxferError as e:
        print(f"dsxfer: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
