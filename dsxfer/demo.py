"""`dsxfer demo` (= `make demo`): few-shot cross-lingual extractive QA on this machine, offline, minutes.

English source data (TyDi QA GoldP English train) plus k target-language shots (MLQA dev) train the
embedded default model (multilingual-e5-small, frozen) twice with the same data, seed and budget:
  baseline  prefixes in the top 4 layers + QA head (no input-level soft prompt), task loss only
  method    the same + the knowledge alignment loss on Tatoeba pairs (English -> each target language)
Both are evaluated per language on a fixed subset of XQuAD; the table compares them over the target
languages (their average is the report's, the English source shown apart). Everything lands under
runs/demo/: report.md + PNG charts and one training-curve PNG per run, each run's folder (weights,
config, train.log, shots.json, checkpoints) and TensorBoard logs (tensorboard --logdir runs/demo).

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
        f"name={run}",  # a role only: tables and charts name a run by what its config.yaml trained
        f"alignment.enabled={'true' if alignment else 'false'}",
        f"data.target_langs=[{','.join(s for _, s, _ in DEMO_LANGS)}]",
        f"alignment.target_langs=[{','.join(t for _, _, t in DEMO_LANGS)}]",
        f"eval.langs=[en,{','.join(langs)}]",
        f"train.output_dir={root / run}",
        "train.overwrite=true",  # the demo makes its two runs anew each time
    ] + list(extra)


def comparison_table(tables: list, baseline: str, method: str) -> str:
    """Markdown: per target language F1 / EM of both runs and the difference, then the target average
    (the report's own numbers and definition), then the source language apart."""
    f1 = next(t for t in tables if t.metric == "f1")
    em = next(t for t in tables if t.metric == "exact_match")

    def pair(t, lang):
        cell = (lambda m: t.avg.get(m)) if lang == "avg" else (lambda m: t.cells.get((m, lang)))
        b, m = cell(baseline), cell(method)
        if b is None or m is None:
            return "- | - | -"
        return f"{b['mean']:.1f} | {m['mean']:.1f} | {m['mean'] - b['mean']:+.1f}"

    lines = ["| language | baseline F1 | method F1 | delta F1 | baseline EM | method EM | delta EM |", "|" + "---|" * 7]
    for lang in f1.targets + ["avg"]:
        name = f1.avg_name if lang == "avg" else lang
        lines.append(f"| {name} | {pair(f1, lang)} | {pair(em, lang)} |")
    if f1.has_source:
        lines.append(f"| {f1.source} (source, not in the average) | {pair(f1, f1.source)} | {pair(em, f1.source)} |")
    n = max(f1.n_runs.values())
    return (f"Few-shot cross-lingual QA on {f1.data} ({f1.definition()}).\n\n"
            f"- baseline: {baseline}\n- method: {method}\n\n" + "\n".join(lines)
            + (f"\n\nOne seed (n = {n}): differences of a few points are noise." if n == 1 else ""))


def write_demo_report(root: Path, eval_dirs: list[Path], timings: dict[str, float], total_s: float) -> dict:
    """runs/demo/report.md: the comparison table, the setup, then the full `dsxfer report` of both runs."""
    from dsxfer.evaluation.report import write_report

    report = write_report(eval_dirs, root)
    labels = report["methods"]
    baseline, method = (labels[str(d.parent)] for d in eval_dirs)
    table = comparison_table(report["tables"], baseline, method)
    setup = ("Source: TyDi QA GoldP English train (a seeded pool; SQuAD is not bundled); k = 8 target shots per language "
             "from MLQA dev; alignment pairs: Tatoeba eng-deu/spa/cmn. Backbone frozen (multilingual-e5-small, embedded); "
             "both runs share data, seed and budget and differ only in the alignment loss.")
    md = (f"# dsxfer demo\n\n{table}\n\n{setup}\n\nWall time {total_s:.0f} s on this machine "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).\n\n## Report (dsxfer report)\n\n{report['markdown']}")
    (root / "report.md").write_text(md, encoding="utf-8")
    return {**report, "table": table, "setup": setup}


def run_demo(output_dir: str = "runs/demo", *extra: str, quiet: bool = False) -> dict:
    """Train baseline and method, evaluate both on the XQuAD subset, write the report; returns the scores."""
    import torch

    from dsxfer.config import load_config
    from dsxfer.method.embedded import embedded_model_path, print_summary
    from dsxfer.evaluation.evaluate import run_eval
    from dsxfer.training.train import train

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    print_summary(embedded_model_path())
    timings, scores, eval_dirs = {}, {}, []
    langs = ["en"] + [x for x, _, _ in DEMO_LANGS]
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
        eval_dirs.append(eval_dir)
        print(f"{run}: trained {summary['step']} steps in {timings[f'{run} train']:.0f} s, evaluated in {timings[f'{run} eval']:.0f} s")

    total = time.perf_counter() - t0
    report = write_demo_report(root, eval_dirs, timings, total)
    (root / "demo_scores.json").write_text(json.dumps({"scores": scores, "timings_s": timings, "total_s": total}, indent=1))
    print("\n" + report["table"] + "\n")
    print(report["setup"])
    print(f"\nwall time {total:.0f} s")
    print(f"report:      {root / 'report.md'}")
    for image in report["images"] + report["curves"]:
        print(f"chart:       {image}")
    print(f"runs:        {root / 'baseline'}  {root / 'method'}  (weights, config.yaml, train.log, shots.json)")
    print(f"TensorBoard: tensorboard --logdir {root}   then open http://localhost:6006")
    return {"scores": scores, "timings": timings, "total_s": total, "report": str(root / "report.md")}
