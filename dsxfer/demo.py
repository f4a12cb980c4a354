"""`dsxfer demo` (= `make demo`): few-shot cross-lingual extractive QA on this machine, offline, minutes.

English source data (TyDi QA GoldP English train) plus k target-language shots (MLQA dev) train the
embedded default model (multilingual-e5-small, frozen) twice with the same data, seed and budget:
  baseline  prompt injection + QA head, task loss only
  method    the same + the knowledge alignment loss on Tatoeba pairs (English -> each target language)
Both are evaluated per language on a fixed subset of XQuAD; the table compares them. Everything lands
under runs/demo/: report.md + PNG charts, each run's folder (weights, config, train.log, shots.json,
checkpoints) and TensorBoard logs (tensorboard --logdir runs/demo).

The settings below are the demo's budget on a 2-core CPU: short sequences, a small QA pool, prefixes in
the top layers only (backward stops early), no input-level soft prompt (it would need backward through
every layer). configs/demo.yaml holds the same settings for `dsxfer train`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# (language for the table: XQuAD code, MLQA shot code, Tatoeba code)
DEMO_LANGS = [("de", "de", "deu"), ("es", "es", "spa"), ("zh", "zh", "cmn")]

DEMO_SETTINGS = [
    "model.max_length=160", "model.doc_stride=48",
    "prompts.length=0", "injection.length=8", "injection.layers=top_k", "injection.top_k=4",
    "injection.reparam=true", "injection.reparam_hidden=64", "freezing.strategy=frozen",
    "alignment.loss=cosine", "alignment.layers=[-1]", "alignment.weight=1.0", "alignment.batch_size=8",
    "alignment.every=2", "alignment.max_length=32", "alignment.max_pairs=200",
    "data.train_task=tydiqa", "data.source_lang=en", "data.max_train_examples=480", "data.dev_examples=30",
    "data.shot_task=mlqa", "data.k_shot=8",
    "train.max_steps=100", "train.lr=1e-2", "train.warmup_steps=5", "train.scheduler=linear",
    "train.micro_batch_size=8", "train.grad_accum=1", "train.log_every=5", "train.eval_every=0",
    "train.save_every=0", "train.keep_last=1", "train.seed=13",
    "eval.tasks=[xquad]", "eval.max_examples=60", "eval.batch_size=32",
]


def _overrides(root: Path, run: str, alignment: bool, extra: list[str]) -> list[str]:
    langs = [x for x, _, _ in DEMO_LANGS]
    return DEMO_SETTINGS + [
        f"name={'method (prompts + alignment)' if alignment else 'baseline (prompts only)'}",
        f"alignment.enabled={'true' if alignment else 'false'}",
        f"data.target_langs=[{','.join(s for _, s, _ in DEMO_LANGS)}]",
        f"alignment.target_langs=[{','.join(t for _, _, t in DEMO_LANGS)}]",
        f"eval.langs=[en,{','.join(langs)}]",
        f"train.output_dir={root / run}",
        "train.overwrite=true",  # the demo makes its two runs anew each time
    ] + list(extra)


def _table(scores: dict[str, dict], langs: list[str], data_note: str) -> str:
    """Markdown: per language F1 / EM of both runs and the difference."""
    base, meth = scores["baseline"], scores["method"]
    head = "| language | baseline F1 | method F1 | delta F1 | baseline EM | method EM | delta EM |"
    lines = [head, "|" + "---|" * 7]
    avg = {k: [] for k in ("bf", "mf", "be", "me")}
    for lang in langs + ["avg (targets)"]:
        if lang.startswith("avg"):
            b_f1, m_f1, b_em, m_em = (sum(avg[k]) / max(len(avg[k]), 1) for k in ("bf", "mf", "be", "me"))
        else:
            b_f1, m_f1 = base[lang]["f1"], meth[lang]["f1"]
            b_em, m_em = base[lang]["exact_match"], meth[lang]["exact_match"]
            if lang != "en":
                for k, v in zip(("bf", "mf", "be", "me"), (b_f1, m_f1, b_em, m_em)):
                    avg[k].append(v)
        lines.append(f"| {lang} | {b_f1:.1f} | {m_f1:.1f} | {m_f1 - b_f1:+.1f} | {b_em:.1f} | {m_em:.1f} | {m_em - b_em:+.1f} |")
    return f"Few-shot cross-lingual QA on {data_note} (en = source language; de, es, zh = targets)\n\n" + "\n".join(lines)


def run_demo(output_dir: str = "runs/demo", *extra: str, quiet: bool = False) -> dict:
    """Train baseline and method, evaluate both on the XQuAD subset, write the report; returns the scores."""
    import torch

    from dsxfer.config import load_config
    from dsxfer.embedded import embedded_model_path, print_summary
    from dsxfer.evaluate import run_eval
    from dsxfer.report import write_report
    from dsxfer.train import train

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    print_summary(embedded_model_path())
    timings, scores, eval_dirs = {}, {}, []
    langs = ["en"] + [x for x, _, _ in DEMO_LANGS]
    note = ""
    for run, alignment in (("baseline", False), ("method", True)):
        cfg = load_config(None, _overrides(root, run, alignment, list(extra)))
        print(f"\n=== {cfg.name}: {cfg.train.max_steps} steps x {cfg.train.micro_batch_size} features"
              + (f", + {cfg.alignment.batch_size} parallel pairs every {cfg.alignment.every} micro-batches" if alignment else ""), flush=True)
        t = time.perf_counter()
        summary = train(cfg, quiet=quiet)
        timings[f"{run} train"] = time.perf_counter() - t
        t = time.perf_counter()
        eval_dir = root / run / "eval"
        doc = run_eval("xquad", langs, run_dir=str(root / run), max_examples=cfg.eval.max_examples, output_dir=eval_dir,
                       batch_size=cfg.eval.batch_size, seed=0, progress=not quiet)
        timings[f"{run} eval"] = time.perf_counter() - t
        scores[run] = {r["lang"]: r for r in doc["results"]}
        note = doc["results"][0]["data"]
        eval_dirs.append(eval_dir)
        print(f"{run}: trained {summary['step']} steps in {timings[f'{run} train']:.0f} s, evaluated in {timings[f'{run} eval']:.0f} s")

    report = write_report(eval_dirs, root)
    table = _table(scores, langs, note)
    total = time.perf_counter() - t0
    setup = ("Source: TyDi QA GoldP English train (a seeded pool; SQuAD is not bundled); k = 8 target shots per language "
             "from MLQA dev; alignment pairs: Tatoeba eng-deu/spa/cmn. Backbone frozen (multilingual-e5-small, embedded); "
             "trainable: top-4-layer prefixes (MLP-reparameterised) + QA head. One seed: differences of a few points are noise.")
    md = (f"# dsxfer demo\n\n{table}\n\n{setup}\n\nWall time {total:.0f} s on this machine "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).\n\n## Report (dsxfer report)\n\n{report['markdown']}\n")
    (root / "report.md").write_text(md, encoding="utf-8")
    (root / "demo_scores.json").write_text(json.dumps({"scores": scores, "timings_s": timings, "total_s": total}, indent=1))
    print("\n" + table + "\n")
    print(setup)
    print(f"\nwall time {total:.0f} s")
    print(f"report:      {root / 'report.md'}")
    for image in report["images"]:
        print(f"chart:       {image}")
    print(f"runs:        {root / 'baseline'}  {root / 'method'}  (weights, config.yaml, train.log, shots.json)")
    print(f"TensorBoard: tensorboard --logdir {root}   then open http://localhost:6006")
    return {"scores": scores, "timings": timings, "total_s": total, "report": str(root / "report.md")}
