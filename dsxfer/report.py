"""Result reports across runs: per-language tables with the average, multi-seed aggregation, charts.

Input: run folders holding a scores.json written by `dsxfer eval` (directly, or one level down, e.g.
<run>/eval/scores.json). Runs with the same method name (scores.json "method", else the run's
config.yaml `name`) are seeds of one method and are aggregated: mean, standard deviation (sample,
n-1; 0 for a single run) and minimum per task, language and metric.

The average column averages each run over its languages first, then aggregates those averages over
the runs (so its std is the seed-to-seed spread of the average).

Output: report.md, report.csv (long format), report.json, and per task and metric a grouped bar chart
(x = language, one bar per method, error bars = std) and a method x language heatmap (PNG).
Every table names the data it evaluates on (e.g. "MLQA dev", "XQuAD subset of 100").
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsxfer.errors import DataError

METRIC_LABEL = {"f1": "F1", "exact_match": "EM", "accuracy": "accuracy"}


def find_scores(run_dir: str | Path) -> list[Path]:
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"run folder {run} does not exist; pass folders written by dsxfer train / dsxfer eval")
    found = [run / "scores.json"] if (run / "scores.json").is_file() else sorted(run.glob("*/scores.json"))
    if not found:
        raise DataError(f"{run}: no scores.json here or one level down; run `dsxfer eval --output_dir {run}` first")
    return found


def _method_name(path: Path, doc: dict[str, Any]) -> str:
    if doc.get("method"):
        return str(doc["method"])
    for cfg in (path.parent / "config.yaml", path.parent.parent / "config.yaml"):
        if cfg.is_file():
            import yaml

            name = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("name")
            if name:
                return str(name)
    return path.parent.name


def load_runs(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per (run, task, lang, metric): {method, run, seed, task, lang, metric, value, data}."""
    rows = []
    for run_dir in run_dirs:
        for path in find_scores(run_dir):
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); rerun dsxfer eval to rewrite it") from None
            if not isinstance(doc.get("results"), list):
                raise DataError(f"{path}: field 'results' is missing; this is not a scores.json written by dsxfer eval")
            method = _method_name(path, doc)
            for r in doc["results"]:
                for metric in ("f1", "exact_match", "accuracy"):
                    if metric in r:
                        rows.append({"method": method, "run": str(path.parent), "seed": doc.get("seed"),
                                     "task": r["task"], "lang": r["lang"], "metric": metric,
                                     "value": float(r[metric]), "data": r.get("data", r["task"])})
    return rows


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "n_runs": n}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, std, min over the runs of each (task, metric, method, lang), plus an 'avg' language."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    data_notes: dict[tuple, set[str]] = defaultdict(set)
    for r in rows:
        key = (r["task"], r["metric"], r["method"], r["lang"])
        groups[key].append(r["value"])
        data_notes[(r["task"], r["metric"])].add(r["data"])
    out = []
    for (task, metric, method, lang), values in groups.items():
        out.append({"task": task, "metric": metric, "method": method, "lang": lang,
                    "data": " / ".join(sorted(data_notes[(task, metric)])), **_stats(values)})
    # the average over languages, per run, then aggregated over the runs of a method like a language
    per_run: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        per_run[(r["task"], r["metric"], r["method"], r["run"])].append(r["value"])
    averages: dict[tuple, list[float]] = defaultdict(list)
    for (task, metric, method, _run), values in per_run.items():
        averages[(task, metric, method)].append(sum(values) / len(values))
    for (task, metric, method), values in averages.items():
        out.append({"task": task, "metric": metric, "method": method, "lang": "avg",
                    "data": " / ".join(sorted(data_notes[(task, metric)])), **_stats(values)})
    return sorted(out, key=lambda a: (a["task"], a["metric"], a["method"], a["lang"] == "avg", a["lang"]))


def _tables(agg: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    for a in agg:
        t = tables.setdefault((a["task"], a["metric"]), {"data": a["data"], "langs": [], "methods": [], "cells": {}})
        if a["lang"] != "avg" and a["lang"] not in t["langs"]:
            t["langs"].append(a["lang"])
        if a["method"] not in t["methods"]:
            t["methods"].append(a["method"])
        t["cells"][(a["method"], a["lang"])] = a
    return tables


def _cell(a: dict[str, Any] | None) -> str:
    if a is None:
        return "-"
    if a["n_runs"] == 1:
        return f"{a['mean']:.1f}"
    return f"{a['mean']:.1f} ± {a['std']:.1f} (min {a['min']:.1f})"


def markdown(agg: list[dict[str, Any]]) -> str:
    parts = []
    for (task, metric), t in _tables(agg).items():
        seeds = max(a["n_runs"] for a in t["cells"].values())
        seed_note = f"; mean ± std (min) over {seeds} runs" if seeds > 1 else ""
        parts.append(f"### {task}: {METRIC_LABEL[metric]} on {t['data']}{seed_note}\n")
        cols = t["langs"] + ["avg"]
        parts.append("| method | " + " | ".join(cols) + " |")
        parts.append("|---|" + "---|" * len(cols))
        for m in t["methods"]:
            parts.append(f"| {m} | " + " | ".join(_cell(t["cells"].get((m, c))) for c in cols) + " |")
        parts.append("")
    return "\n".join(parts)


def _plots(agg: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for (task, metric), t in _tables(agg).items():
        langs, methods = t["langs"], t["methods"]
        means = np.array([[t["cells"].get((m, lang), {}).get("mean", np.nan) for lang in langs] for m in methods])
        stds = np.array([[t["cells"].get((m, lang), {}).get("std", 0.0) for lang in langs] for m in methods])
        title = f"{task} {METRIC_LABEL[metric]} ({t['data']})"

        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(langs) * max(1, len(methods)) / 2 + 3), 4))
        width = 0.8 / len(methods)
        x = np.arange(len(langs))
        for i, m in enumerate(methods):
            ax.bar(x + i * width - 0.4 + width / 2, means[i], width, yerr=stds[i], capsize=2, label=m)
        ax.set_xticks(x, langs)
        ax.set_ylabel(METRIC_LABEL[metric])
        ax.set_title(title)
        ax.legend(fontsize="small")
        fig.tight_layout()
        bar_path = out_dir / f"{task}_{metric}_bars.png"
        fig.savefig(bar_path, dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(langs) + 3), 0.5 * len(methods) + 2))
        im = ax.imshow(means, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(langs)), langs)
        ax.set_yticks(range(len(methods)), methods)
        for i in range(len(methods)):
            for j in range(len(langs)):
                if not np.isnan(means[i, j]):
                    ax.text(j, i, f"{means[i, j]:.1f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, label=METRIC_LABEL[metric])
        ax.set_title(title)
        fig.tight_layout()
        heat_path = out_dir / f"{task}_{metric}_heatmap.png"
        fig.savefig(heat_path, dpi=100)
        plt.close(fig)
        written += [bar_path, heat_path]
    return written


def write_report(run_dirs: Sequence[str | Path], output_dir: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Aggregate the runs and write report.md, report.csv, report.json (+ PNG charts) into output_dir."""
    if not run_dirs:
        raise DataError("no run folders given: dsxfer report RUN_DIR [RUN_DIR ...]")
    rows = load_runs(run_dirs)
    if not rows:
        raise DataError("the scores.json files hold no results; rerun dsxfer eval")
    agg = aggregate(rows)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(agg)
    (out / "report.md").write_text(md, encoding="utf-8")
    fields = ["task", "data", "metric", "method", "lang", "mean", "std", "min", "n_runs"]
    with open(out / "report.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(agg)
    doc = {"runs": [str(r) for r in run_dirs], "aggregate": agg, "per_run": rows}
    (out / "report.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    images = _plots(agg, out) if plots else []
    return {"markdown": md, "aggregate": agg, "images": [str(p) for p in images], "output_dir": str(out)}
