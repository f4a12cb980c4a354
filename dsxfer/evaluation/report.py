"""Result reports across runs: per-language tables, multi-seed aggregation, charts, training curves.

Input: folders holding a scores.json written by `dsxfer eval` (directly, or one level down, e.g.
<run>/eval/scores.json). The run that produced the scores is the folder with its config.yaml (the
scores' run_dir, the scores folder, or the one above it).

What a row of a table is called comes from what the run trained, never from a free-text name:
`describe_run` reads the run's config.yaml (soft prompt, prefixes and their layers, freezing, LoRA,
head, shots, alignment form or off, pseudo data). Runs whose configs differ only in the seed (and
where they were written) are the n seeds of one method; when two groups would get the same label,
the config keys that tell them apart are appended. Scores without a run config (an untrained
backbone) keep the method name dsxfer eval wrote.

One definition of every average, stated in every table and chart: the target languages are every
evaluated language except the run's source language (config data.source_lang; "en" when no run
config exists). A run's average is the mean over the table's target languages (a run that lacks one of
them has no average); a method's average is the mean of its runs' averages, so its std is the
seed-to-seed spread of the average. The source language is shown apart and never enters an average.
Mean, sample std (n-1) and min are over the n runs of a method; std is shown, and error bars are drawn,
only when n > 1.

Output: report.md, report.csv (long format), report.json, and per task and metric a grouped bar chart
(targets, their average, then the source apart; a majority-class line on classification charts) and
a method x language heatmap; per run a training-curve chart (task loss, alignment loss, per-language
alignment cosine over the optimizer steps) read from the run's TensorBoard files, else its train.log.
Every table names the data it evaluates on (e.g. "MLQA dev", "XQuAD subset of 100").
"""

from __future__ import annotations

import csv
import json
import math
import re
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsxfer.errors import DataError

METRIC_LABEL = {"f1": "F1", "exact_match": "EM", "accuracy": "accuracy"}  # also the order of the tables
DEFAULT_SOURCE_LANG = "en"  # every bundled training task is English; used only when a run has no config
MAJORITY_METHOD = "majority class"

# Config keys that never change what a run learned: runs differing only here are seeds of one method.
_NOT_THE_METHOD = ("name", "train.seed", "train.output_dir", "train.resume", "train.tensorboard", "train.log_every",
                   "train.save_every", "train.keep_last", "deepspeed.config", "data.data_dir")


# ---------------------------------------------------------------------------------- run configs


def _merge(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = dict(defaults)
    for key, value in given.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """<run_dir>/config.yaml over dsxfer's defaults, as a plain dict (no validation: an older or newer
    config still describes its run); None when the folder has no config.yaml."""
    import yaml

    from dsxfer.config import ExperimentConfig

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); restore the config.yaml training wrote") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a mapping of config sections, got {type(raw).__name__}; restore the config.yaml training wrote")
    return _merge(ExperimentConfig().to_dict(), raw)


def _layers_text(spec: Any, top_k: int) -> str:
    if spec == "all":
        return "all layers"
    if spec == "top_k":
        return f"top {top_k} layers"
    layers = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    return ("layer " if len(layers) == 1 else "layers ") + ",".join(str(i) for i in layers)


def describe_run(cfg: dict[str, Any]) -> str:
    """A label that says what a run trained, from its config (read_run_config), e.g.
    'prefixes 8 in top 4 layers (MLP) + QA head; 8 shots; cosine alignment (deu,spa,cmn)'."""
    p, inj, fr, ad, al, d = (cfg["prompts"], cfg["injection"], cfg["freezing"], cfg["adapters"], cfg["alignment"], cfg["data"])
    trained = []
    if p.get("task_prompt"):
        trained.append("task prompt (loaded, frozen)")
    if p.get("language_prompt"):
        trained.append("language prompt (loaded, frozen)")
    if p["length"] > 0:
        trained.append(f"soft prompt {p['length']}")
    if inj["length"] > 0:
        trained.append(f"prefixes {inj['length']} in {_layers_text(inj['layers'], inj['top_k'])}" + (" (MLP)" if inj["reparam"] else ""))
    unfrozen = {"top_k": f"top {fr['top_k']} layers unfrozen", "bias_only": "backbone biases", "layernorm": "backbone LayerNorms",
                "embeddings_frozen": "backbone except embeddings",
                "gradual": f"gradual unfreezing to {fr['top_k']} layers"}.get(fr["strategy"])
    if unfrozen:
        trained.append(unfrozen)
    if ad["lora"]:
        trained.append(f"LoRA r{ad['r']} ({','.join(ad['target_modules'])})")
    trained.append("QA head" if cfg["model"]["task"] == "qa" else "classification head")
    parts = [" + ".join(trained)]
    parts.append(f"{d['k_shot']} shots" if d["k_shot"] > 0 else "zero-shot")
    if al["enabled"]:
        parts.append(f"{al['loss']} alignment ({','.join(al['target_langs'])})")
    else:
        parts.append("no alignment")
    if al.get("preservation_weight", 0) > 0:
        parts.append(f"KL preservation {al['preservation_weight']:g}")
    pseudo = []
    if d.get("codeswitch_prob", 0) > 0:
        pseudo.append(f"code-switched p={d['codeswitch_prob']:g}")
    if d.get("translate_train"):
        pseudo.append(f"translate-train x{len(d['translate_train'])}")
    if pseudo:
        parts.append("pseudo data: " + ", ".join(pseudo))
    return "; ".join(parts)


def _flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = json.dumps(value, sort_keys=True)
    return out


def _method_keys(cfg: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in _flatten(cfg).items() if k not in _NOT_THE_METHOD and not k.startswith("eval.")}


# ---------------------------------------------------------------------------------- reading runs


def find_scores(run_dir: str | Path) -> list[Path]:
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"run folder {run} does not exist; pass folders written by dsxfer train / dsxfer eval")
    found = [run / "scores.json"] if (run / "scores.json").is_file() else sorted(run.glob("*/scores.json"))
    if not found:
        raise DataError(f"{run}: no scores.json here or one level down; run `dsxfer eval --output_dir {run}` first")
    return found


def _run_folder(path: Path, doc: dict[str, Any]) -> Path | None:
    """The training run behind a scores.json: the folder with the config.yaml training wrote."""
    candidates = [Path(doc["run_dir"])] if doc.get("run_dir") else []
    candidates += [path.parent, path.parent.parent]
    return next((c for c in candidates if (c / "config.yaml").is_file()), None)


def _name_methods(evals: list[dict[str, Any]]) -> None:
    """Set each evaluation's 'method': the label of what it trained, made unique across differing configs."""
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in evals:
        by_label[e["label"]].append(e)
    for label, group in by_label.items():
        keys = [_method_keys(e["config"]) for e in group if e["config"] is not None]
        differing = sorted({k for a in keys for b in keys for k in set(a) | set(b) if a.get(k) != b.get(k)})
        for e in group:
            if e["config"] is None or not differing:
                e["method"] = label
            else:
                mine = _method_keys(e["config"])
                e["method"] = f"{label} [{', '.join(f'{k}={mine.get(k)}' for k in differing)}]"


def load_runs(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per (run, task, lang, metric): {method, run, run_dir, seed, source_lang, task, lang, metric,
    value, data, majority}."""
    evals = []
    for run_dir in run_dirs:
        for path in find_scores(run_dir):
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); rerun dsxfer eval to rewrite it") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
                raise DataError(f"{path}: field 'results' is missing; this is not a scores.json written by dsxfer eval")
            folder = _run_folder(path, doc)
            cfg = read_run_config(folder) if folder is not None else None
            label = describe_run(cfg) if cfg is not None else str(doc.get("method") or path.parent.name)
            evals.append({"path": path, "doc": doc, "folder": folder, "config": cfg, "label": label})
    _name_methods(evals)
    rows = []
    for e in evals:
        cfg, doc = e["config"], e["doc"]
        source = cfg["data"]["source_lang"] if cfg is not None else DEFAULT_SOURCE_LANG
        seed = cfg["train"]["seed"] if cfg is not None else doc.get("seed")
        for r in doc["results"]:
            for metric in ("f1", "exact_match", "accuracy"):
                if metric in r:
                    rows.append({"method": e["method"], "run": str(e["path"].parent),
                                 "run_dir": str(e["folder"]) if e["folder"] is not None else None, "seed": seed,
                                 "source_lang": source, "source_from_config": cfg is not None, "task": r["task"], "lang": r["lang"], "metric": metric,
                                 "value": float(r[metric]), "data": r.get("data", r["task"]),
                                 "majority": r.get("majority_accuracy") if metric == "accuracy" else None})
    return rows


# ---------------------------------------------------------------------------------- aggregation


def _stats(values: list[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "n_runs": n}


def target_average(values: dict[str, float], targets: Sequence[str]) -> float | None:
    """THE average of every dsxfer table: the mean over the target languages (None when one is missing)."""
    if not targets or any(t not in values for t in targets):
        return None
    return sum(values[t] for t in targets) / len(targets)


@dataclass
class Table:
    """One task x metric: per method and language the stats over the method's runs."""

    task: str
    metric: str
    data: str
    source: str
    targets: list[str]
    has_source: bool
    source_assumed: bool = False  # no run had a config.yaml that names its source language
    methods: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # (method, lang) -> stats
    avg: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> stats of the runs' averages
    n_runs: dict[str, int] = field(default_factory=dict)
    majority: dict[str, float] = field(default_factory=dict)  # lang -> majority-class rate of the evaluated labels

    @property
    def columns(self) -> list[str]:
        return self.targets + (["avg"] if self.targets else []) + ([self.source] if self.has_source else [])

    @property
    def avg_name(self) -> str:
        return f"avg ({', '.join(self.targets)})"

    @property
    def classification(self) -> bool:
        return self.metric == "accuracy"

    def majority_avg(self) -> float | None:
        return target_average(self.majority, self.targets)

    def definition(self) -> str:
        """The sentence every table and chart carries: what the average is and what n is."""
        ns = sorted(set(self.n_runs.values()))
        n_text = f"n = {ns[0]}" if len(ns) == 1 else "n = " + "-".join(str(x) for x in (ns[0], ns[-1]))
        runs = "run" if ns == [1] else "runs (seeds)"
        avg = (f"avg = mean over the target languages {', '.join(self.targets)}" if self.targets else "no target language")
        source = (f"source language {self.source}" + (" (assumed: no run config)" if self.source_assumed else "")
                  + (" shown apart, not in the average" if self.has_source else " (not evaluated)"))
        return f"{n_text} {runs} per method; {avg}; {source}"


def build_tables(rows: list[dict[str, Any]]) -> list[Table]:
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        grouped[(r["task"], r["metric"])].append(r)
    tables = []
    for (task, metric), group in grouped.items():
        sources = sorted({r["source_lang"] for r in group})
        if len(sources) > 1:
            runs = {s: next(r["run"] for r in group if r["source_lang"] == s) for s in sources}
            raise DataError(f"{task}: runs trained on different source languages ({', '.join(f'{s} in {p}' for s, p in runs.items())}); "
                            "report them separately, since each table averages over the languages that are not the source")
        source = sources[0]
        langs = list(dict.fromkeys(r["lang"] for r in group))
        t = Table(task, metric, " / ".join(sorted({r["data"] for r in group})), source,
                  [lang for lang in langs if lang != source], source in langs,
                  source_assumed=not any(r.get("source_from_config") for r in group))
        per_cell: dict[tuple[str, str], list[float]] = defaultdict(list)
        per_run: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        majority: dict[str, list[float]] = defaultdict(list)
        for r in group:
            if r["method"] not in t.methods:
                t.methods.append(r["method"])
            per_cell[(r["method"], r["lang"])].append(r["value"])
            per_run[(r["method"], r["run"])][r["lang"]] = r["value"]
            if r.get("majority") is not None:
                majority[r["lang"]].append(float(r["majority"]))
        t.cells = {key: _stats(values) for key, values in per_cell.items()}
        averages: dict[str, list[float]] = defaultdict(list)
        for (method, _run), values in per_run.items():
            a = target_average(values, t.targets)
            if a is not None:
                averages[method].append(a)
        t.avg = {method: _stats(values) for method, values in averages.items()}
        t.n_runs = {m: len({run for (mm, run) in per_run if mm == m}) for m in t.methods}
        t.majority = {lang: sum(v) / len(v) for lang, v in majority.items()}
        tables.append(t)
    return sorted(tables, key=lambda t: (t.task, list(METRIC_LABEL).index(t.metric)))


def long_format(tables: Sequence[Table]) -> list[dict[str, Any]]:
    """Per task, metric, method and language the stats (mean, std, min, n_runs) and the role target /
    source / avg; lang 'avg' is the target average; method 'majority class' the majority-class rate."""
    out = []
    for t in tables:
        base = {"task": t.task, "metric": t.metric, "data": t.data}
        for m in t.methods:
            for lang in t.targets + ([t.source] if t.has_source else []):
                if (m, lang) in t.cells:
                    role = "source" if lang == t.source else "target"
                    out.append({**base, "method": m, "lang": lang, "role": role, **t.cells[(m, lang)]})
            if m in t.avg:
                out.append({**base, "method": m, "lang": "avg", "role": "avg", "langs": ",".join(t.targets), **t.avg[m]})
        for lang, rate in t.majority.items():
            out.append({**base, "method": MAJORITY_METHOD, "lang": lang, "role": "source" if lang == t.source else "target",
                        **_stats([rate])})
        if t.majority_avg() is not None:
            out.append({**base, "method": MAJORITY_METHOD, "lang": "avg", "role": "avg", "langs": ",".join(t.targets),
                        **_stats([t.majority_avg()])})
    return out


# ------------------------------------------------------------------------------------- markdown


def _cell(a: dict[str, Any] | None) -> str:
    if a is None:
        return "-"
    if a["n_runs"] == 1:
        return f"{a['mean']:.1f}"
    return f"{a['mean']:.1f} ± {a['std']:.1f} (min {a['min']:.1f})"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table_markdown(t: Table) -> str:
    seeds = max(t.n_runs.values())
    how = "mean ± std (min) over the n runs" if seeds > 1 else "the score of the single run"
    lines = [f"### {t.task}: {METRIC_LABEL[t.metric]} on {t.data}\n", f"{t.definition()}; cells: {how}.\n"]
    heads = t.targets + ([t.avg_name] if t.targets else []) + ([f"{t.source} (source)"] if t.has_source else [])
    lines.append("| method | n | " + " | ".join(heads) + " |")
    lines.append("|---|---|" + "---|" * len(heads))
    for m in t.methods:
        cells = [_cell(t.cells.get((m, lang))) for lang in t.targets]
        if t.targets:
            cells.append(_cell(t.avg.get(m)))
        if t.has_source:
            cells.append(_cell(t.cells.get((m, t.source))))
        lines.append(f"| {m} | {t.n_runs[m]} | " + " | ".join(cells) + " |")
    if t.majority:
        cells = [_rate(t.majority.get(lang)) for lang in t.targets]
        if t.targets:
            cells.append(_rate(t.majority_avg()))
        if t.has_source:
            cells.append(_rate(t.majority.get(t.source)))
        lines.append(f"| {MAJORITY_METHOD} (of the evaluated labels) | - | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(tables: Sequence[Table]) -> str:
    return "\n".join(table_markdown(t) for t in tables)


# --------------------------------------------------------------------------------------- charts


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width=width, break_on_hyphens=False)) or text


def _cell_stats(t: Table, method: str, lang: str) -> dict[str, float] | None:
    return t.avg.get(method) if lang == "avg" else t.cells.get((method, lang))


def error_bars(t: Table, method: str, langs: Sequence[str]) -> list[float] | None:
    """The std per language to draw as error bars, or None: a method with a single run has no spread."""
    if t.n_runs.get(method, 0) <= 1:
        return None
    return [(_cell_stats(t, method, lang) or {}).get("std", 0.0) for lang in langs]


def _mean(t: Table, method: str, lang: str) -> float:
    cell = _cell_stats(t, method, lang)
    return cell["mean"] if cell else float("nan")


def fit_title(fig, parts: Sequence[str], *, fontsize: str = "medium"):
    """The figure's suptitle, each part wrapped and re-wrapped narrower until the text lies inside the figure."""
    width = max(30, int(fig.get_figwidth() * 12))  # about 12 characters per inch at the medium font size
    while True:
        title = fig.suptitle("\n".join(_wrap(p, width) for p in parts), fontsize=fontsize)
        fig.canvas.draw()  # runs the layout, so the extent is the one the saved image will have
        box = title.get_window_extent()
        if (box.x0 >= 0 and box.x1 <= fig.bbox.width) or width <= 20:
            return title
        width = int(width * 0.85)


def _title_parts(t: Table) -> list[str]:
    return [f"{t.task}: {METRIC_LABEL[t.metric]} on {t.data}", t.definition()]


def bar_figure(t: Table):
    """Grouped bars: the target languages, their average, then the source language apart (dotted line)."""
    plt = _pyplot()
    import numpy as np

    groups = t.targets + (["avg"] if t.targets else [])
    x = list(map(float, range(len(groups))))
    if t.has_source:
        groups.append(t.source)
        x.append(len(x) + 0.5)  # a gap: the source is not one of the averaged languages
    width_in = max(7.0, 1.1 * len(groups) * max(1, len(t.methods)) / 2 + 3)
    fig = plt.figure(figsize=(width_in, 4.8 + 0.35 * len(t.methods)), layout="constrained")
    ax = fig.add_subplot()
    bar_w = 0.8 / max(1, len(t.methods))
    palette = plt.get_cmap("tab10" if len(t.methods) <= 10 else "tab20")  # the default cycle repeats after 10 methods
    for i, m in enumerate(t.methods):
        offsets = np.array(x) + i * bar_w - 0.4 + bar_w / 2
        ax.bar(offsets, [_mean(t, m, g) for g in groups], bar_w, yerr=error_bars(t, m, groups), capsize=3,
               color=palette(i % palette.N), label=_wrap(f"{m} (n={t.n_runs[m]})", 90))
    if t.classification:
        _majority_line(ax, t, groups, x)
    if t.has_source and t.targets:
        ax.axvline(x[-1] - 0.75, color="0.5", linestyle=":", linewidth=1)
    ax.set_xticks(x, [t.avg_name.replace(" (", "\n(") if g == "avg" else (f"{g}\n(source)" if g == t.source and t.has_source else g)
                      for g in groups])
    ax.set_ylabel(METRIC_LABEL[t.metric])
    fig.legend(loc="outside lower center", fontsize="small", ncols=1)
    fit_title(fig, _title_parts(t))
    return fig


def _majority_line(ax, t: Table, groups: list[str], x: list[float]) -> None:
    """The rate of always predicting the most frequent evaluated label, per language group."""
    from dsxfer.data.tasks import TASKS

    rates = {**t.majority, **({"avg": t.majority_avg()} if t.majority_avg() is not None else {})}
    label = "majority class (of the evaluated labels)"
    if not rates:  # scores written before dsxfer eval recorded the label counts: chance level instead
        spec = TASKS.get(t.task)
        if spec is None or not spec.labels:
            return
        rates = {g: 100.0 / len(spec.labels) for g in groups}
        label = f"chance ({100.0 / len(spec.labels):.0f}%, label counts not recorded)"
    for g, xi in zip(groups, x):
        if g in rates:
            line = ax.hlines(rates[g], xi - 0.45, xi + 0.45, colors="k", linestyles="--", linewidth=1.2, label=label)
            line.set_gid("majority")
            label = None  # one legend entry


def heatmap_figure(t: Table):
    plt = _pyplot()
    import numpy as np

    cols = t.columns
    means = np.array([[_mean(t, m, c) for c in cols] for m in t.methods])
    width_in = max(7.0, 0.9 * len(cols) + 5)
    fig = plt.figure(figsize=(width_in, 0.7 * len(t.methods) + 2.6), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(means, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(cols)), [t.avg_name.replace(" (", "\n(") if c == "avg" else
                                     (f"{c}\n(source)" if c == t.source and t.has_source else c) for c in cols])
    ax.set_yticks(range(len(t.methods)), [_wrap(f"{m} (n={t.n_runs[m]})", 45) for m in t.methods], fontsize="small")
    lo, hi = np.nanmin(means), np.nanmax(means)
    for i in range(len(t.methods)):
        for j in range(len(cols)):
            if not np.isnan(means[i, j]):
                bright = hi > lo and (means[i, j] - lo) / (hi - lo) > 0.6  # viridis is light at the top
                ax.text(j, i, f"{means[i, j]:.1f}", ha="center", va="center", color="k" if bright else "w", fontsize=9)
    if t.has_source and t.targets:
        ax.axvline(len(cols) - 1.5, color="w", linewidth=4)  # the source column stands apart
    fig.colorbar(im, ax=ax, label=METRIC_LABEL[t.metric])
    fit_title(fig, _title_parts(t))
    return fig


def _plots(tables: list[Table], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    written = []
    for t in tables:
        for kind, build in (("bars", bar_figure), ("heatmap", heatmap_figure)):
            fig = build(t)
            path = out_dir / f"{t.task}_{t.metric}_{kind}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written


# ------------------------------------------------------------------------------- training curves


_LOG_STEP = re.compile(r"^step (\d+) \| loss \S+ \(task ([^,]+), align ([^,]+),")
_LOG_COS = re.compile(r"\| cos (\S+) (\S+)")


def read_training_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Scalar series of a run: {'loss/task': [(step, value)], 'loss/align': ..., 'align/cosine/<lang>': ...}.

    From the TensorBoard event files in <run_dir>/tb (read with tensorboard's EventAccumulator), else
    parsed from <run_dir>/train.log; {} when the run has neither.
    """
    run = Path(run_dir)
    tb = run / "tb"
    if tb.is_dir() and any(tb.glob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})  # 0 = keep every point
        acc.Reload()
        wanted = [t for t in acc.Tags()["scalars"] if t in ("loss/task", "loss/align") or t.startswith("align/cosine/")]
        return {t: sorted((e.step, e.value) for e in acc.Scalars(t)) for t in wanted}
    log = run / "train.log"
    if not log.is_file():
        return {}
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for line in log.read_text(encoding="utf-8").splitlines():
        m = _LOG_STEP.match(line)
        if not m:
            continue
        step = int(m.group(1))
        series["loss/task"].append((step, float(m.group(2))))
        series["loss/align"].append((step, float(m.group(3))))
        for lang, value in _LOG_COS.findall(line):
            series[f"align/cosine/{lang}"].append((step, float(value)))
    return dict(series)


def training_curve_figure(series: dict[str, list[tuple[int, float]]], title: str, *, alignment: bool):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), layout="constrained")
    panels = [("loss/task", "task loss"), ("loss/align", "alignment loss")]
    def empty(ax, text):
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])

    for ax, (tag, name) in zip(axes, panels):
        points = series.get(tag, [])
        if tag == "loss/align" and not alignment:
            empty(ax, "alignment off in this run\n(no alignment loss)")
        elif points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("loss")
        else:
            empty(ax, f"no {name} logged")
        ax.set_title(name)
    ax = axes[2]
    cosines = sorted(t for t in series if t.startswith("align/cosine/"))
    for tag in cosines:
        ax.plot([s for s, _ in series[tag]], [v for _, v in series[tag]], marker=".", label=tag.rsplit("/", 1)[1])
    if cosines:
        ax.legend(fontsize="small", title="language")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cosine")
    else:
        empty(ax, "no alignment probes logged\n(no align/cosine/* in this run's logs)")
    ax.set_title("alignment cosine, student vs teacher")
    fit_title(fig, [title])
    return fig


def write_training_curves(run_dir: str | Path, out_path: str | Path, label: str | None = None) -> Path | None:
    """One PNG of a run's task loss, alignment loss and per-language alignment cosine; None without logs."""
    series = read_training_curves(run_dir)
    if not series:
        return None
    cfg = read_run_config(run_dir)
    alignment = bool(cfg and cfg["alignment"]["enabled"])
    title = f"{Path(run_dir).name}: {label or (describe_run(cfg) if cfg else Path(run_dir).name)}"
    fig = training_curve_figure(series, title, alignment=alignment)
    out = Path(out_path)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


# ----------------------------------------------------------------------------------- the report


def write_report(run_dirs: Sequence[str | Path], output_dir: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Aggregate the runs and write report.md, report.csv, report.json (+ PNG charts) into output_dir."""
    if not run_dirs:
        raise DataError("no run folders given: dsxfer report RUN_DIR [RUN_DIR ...]")
    rows = load_runs(run_dirs)
    if not rows:
        raise DataError("the scores.json files hold no results; rerun dsxfer eval")
    tables = build_tables(rows)
    agg = long_format(tables)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = _plots(tables, out) if plots else []
    curves: list[Path] = []
    if plots:
        labels = {r["run_dir"]: r["method"] for r in rows if r["run_dir"]}
        used: set[str] = set()
        for run_dir, label in labels.items():
            name = _slug(Path(run_dir).name)
            while name in used:
                name += "_"
            used.add(name)
            path = write_training_curves(run_dir, out / f"curves_{name}.png", label)
            if path is not None:
                curves.append(path)
    md = markdown(tables)
    if images or curves:
        md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images + curves) + "\n"
    (out / "report.md").write_text(md, encoding="utf-8")
    fields = ["task", "data", "metric", "method", "lang", "role", "langs", "mean", "std", "min", "n_runs"]
    with open(out / "report.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(agg)
    doc = {"runs": [str(r) for r in run_dirs], "definition": {f"{t.task}/{t.metric}": t.definition() for t in tables},
           "aggregate": agg, "per_run": rows}
    (out / "report.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    methods = {r["run_dir"]: r["method"] for r in rows if r["run_dir"]}
    return {"markdown": md, "aggregate": agg, "tables": tables, "images": [str(p) for p in images],
            "curves": [str(p) for p in curves], "methods": methods, "output_dir": str(out)}


# --------------------------------------------------------------------- dsxfer reproduce results folders
# A results folder of `dsxfer reproduce` holds grid.json and cells/<cell>/result.json (one training +
# evaluation each). Cells are aggregated with the same Table, statistics and target average as runs are,
# per shot count k: a method's n runs are its seeds at that k.

GRID_FILE = "grid.json"
_CELL_KEYS = ("cell", "method", "task", "k", "seed", "scores", "train", "peak_rss_mb", "wall_s")
TASK_DISPLAY = {"xquad": "XQuAD", "mlqa": "MLQA dev", "pawsx": "PAWS-X dev (held-out rows)",
                "source_dev": "the source dev hold-out (source training questions never trained on)"}


def is_results_folder(path: str | Path) -> bool:
    """True for a folder written by `dsxfer reproduce` (its grid.json or a cell result)."""
    p = Path(path)
    return (p / GRID_FILE).is_file() or any((p / "cells").glob("*/result.json"))


def load_cells(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished cell's result.json (a cell without one is unfinished and left out)."""
    cells = []
    for path in sorted(Path(results_dir).glob("cells/*/result.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); delete it and rerun dsxfer reproduce to redo the cell") from None
        missing = [k for k in _CELL_KEYS if not isinstance(doc, dict) or k not in doc]
        if missing:
            raise DataError(f"{path}: field '{missing[0]}' is missing; this is not a cell result of dsxfer reproduce "
                            "(delete it and rerun dsxfer reproduce to redo the cell)")
        cells.append(doc)
    if not cells:
        raise DataError(f"{results_dir}: no finished cell (cells/*/result.json); run dsxfer reproduce --out {results_dir} first")
    return cells


def cell_rows(cells: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells' scores as report rows (the shape load_runs returns), with the cell's k; a cell is one 'run'."""
    rows = []
    for c in cells:
        for task, per_lang in c["scores"].items():
            for lang, r in per_lang.items():
                for metric in ("f1", "exact_match", "accuracy"):
                    if metric in r:
                        rows.append({"method": c["method"], "run": c["cell"], "run_dir": None, "seed": c["seed"], "k": c["k"],
                                     "source_lang": c.get("source_lang", DEFAULT_SOURCE_LANG), "source_from_config": True,
                                     "task": task, "lang": lang, "metric": metric, "value": float(r[metric]),
                                     "data": TASK_DISPLAY.get(task, task), "n_examples": r.get("n_examples"),
                                     "excluded": r.get("excluded", 0),
                                     "majority": r.get("majority_accuracy") if metric == "accuracy" else None})
    return rows


def grid_tables(rows: list[dict[str, Any]], order: Sequence[str] = ()) -> dict[int, list[Table]]:
    """Per k, the tables of build_tables (methods in the suite's order); the data label names k."""
    out = {}
    for k in sorted({r["k"] for r in rows}):
        tables = build_tables([r for r in rows if r["k"] == k])
        for t in tables:
            t.data = f"{t.data}, k = {k} target shots per language"
            rank = {m: i for i, m in enumerate(order)}
            t.methods.sort(key=lambda m: rank.get(m, len(rank)))
        out[k] = tables
    return out


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def questions_note(rows: list[dict[str, Any]], task: str, k: int) -> str:
    """Questions evaluated per language and the shots left out of them (ranges over the cells)."""
    parts = []
    for lang in dict.fromkeys(r["lang"] for r in rows if r["task"] == task and r["k"] == k):
        mine = [r for r in rows if r["task"] == task and r["k"] == k and r["lang"] == lang and r["metric"] in ("f1", "accuracy")]
        n = [r["n_examples"] for r in mine if r["n_examples"] is not None]
        excluded = [r["excluded"] for r in mine]
        parts.append(f"{lang} {_range(n)}" + (f" ({_range(excluded)} shot rows excluded)" if any(excluded) else ""))
    return "Questions evaluated per language (over the cells): " + "; ".join(parts) + "."


def cell_values(rows: list[dict[str, Any]], task: str, metric: str, targets: Sequence[str],
                source: str | None = None) -> dict[tuple[str, int], dict[str, tuple[Any, float]]]:
    """(method, k) -> cell (run) -> (its seed, its target average; with no targets, its source value)."""
    per_cell: dict[tuple[str, int, str], dict[str, float]] = defaultdict(dict)
    seed_of: dict[str, Any] = {}
    for r in rows:
        if r["task"] == task and r["metric"] == metric:
            per_cell[(r["method"], r["k"], r["run"])][r["lang"]] = r["value"]
            seed_of[r["run"]] = r["seed"]
    out: dict[tuple[str, int], dict[str, tuple[Any, float]]] = defaultdict(dict)
    for (method, k, cell), values in per_cell.items():
        v = target_average(values, targets) if targets else values.get(source)
        if v is not None:
            out[(method, k)][cell] = (seed_of[cell], v)
    return out


def target_avg_by_cell(rows: list[dict[str, Any]], task: str, metric: str, targets: Sequence[str]) -> dict[tuple[str, int], list[float]]:
    """(method, k) -> the target average of each of its cells (seeds)."""
    return {key: [v for _, v in cells.values()] for key, cells in cell_values(rows, task, metric, targets).items()}


def ablation_rows(cells: Sequence[dict[str, Any]], rows: list[dict[str, Any]], tables: dict[int, list[Table]]) -> list[dict[str, Any]]:
    """Each ablation (or tuning variant) cell group against the method it varies: mean, std, n and the difference of
    the means, of the target average (a table without targets, such as the source dev hold-out: of the source).
    Where the two ran on different seeds the difference of the means mixes seed luck in, so each row also has the
    paired difference: the mean of (variant - method) over the seeds both ran, and those seeds."""
    ablates = {c["method"]: c["spec"].get("ablation_of") for c in cells if c.get("spec", {}).get("ablation_of")}
    out = []
    for k, ts in tables.items():
        for t in ts:
            if t.metric not in ("f1", "accuracy"):
                continue
            stats = t.avg if t.targets else {m: t.cells[(m, t.source)] for m in t.methods if (m, t.source) in t.cells}
            of_what = "target avg" if t.targets else f"{t.source} (source)"
            seeds = defaultdict(dict)  # method -> seed -> the value this table's ablation column compares
            for (m, kk), cells_of in cell_values(rows, t.task, t.metric, t.targets, t.source).items():
                if kk == k:
                    seeds[m].update(dict(cells_of.values()))
            for base in dict.fromkeys(ablates.values()):
                if base not in stats:
                    continue
                b = stats[base]
                out.append({"task": t.task, "metric": t.metric, "k": k, "method": base, "change": "(the method itself)", "of": of_what,
                            **b, "delta": 0.0, "paired_delta": 0.0, "paired_seeds": sorted(seeds[base])})
                for m, of in ablates.items():
                    if of == base and m in stats:
                        both = sorted(set(seeds[m]) & set(seeds[base]))
                        paired = sum(seeds[m][s] - seeds[base][s] for s in both) / len(both) if both else None
                        out.append({"task": t.task, "metric": t.metric, "k": k, "method": m, "of": of_what,
                                    "change": next(c["spec"].get("change") for c in cells if c["method"] == m),
                                    **stats[m], "delta": stats[m]["mean"] - b["mean"], "paired_delta": paired, "paired_seeds": both})
    return out


def efficiency_rows(cells: Sequence[dict[str, Any]], order: Sequence[str]) -> list[dict[str, Any]]:
    """Per method: cells, train features/s, peak memory and wall time (mean over its cells)."""
    out = []
    methods = sorted({c["method"] for c in cells}, key=lambda m: (list(order).index(m) if m in order else len(order), m))
    for m in methods:
        mine = [c for c in cells if c["method"] == m]
        fps = [c["train"]["features_per_s"] for c in mine if c["train"].get("features_per_s")]
        evals = [c["eval_s"] for c in mine if c.get("eval_s") is not None]
        out.append({"method": m, "cells": len(mine), "features_per_s": sum(fps) / len(fps) if fps else None,
                    "eval_s": sum(evals) / len(evals) if evals else None,
                    "peak_rss_mb": sum(c["peak_rss_mb"] for c in mine) / len(mine), "wall_s": sum(c["wall_s"] for c in mine) / len(mine),
                    "wall_s_total": sum(c["wall_s"] for c in mine)})
    return out


def k_curve_figure(rows: list[dict[str, Any]], task: str, metric: str, targets: Sequence[str], methods: Sequence[str], *, std_only: bool):
    """The target average against k per method: the mean with a ±std band (std_only: the std itself, the stability)."""
    plt = _pyplot()
    by = target_avg_by_cell(rows, task, metric, targets)
    fig = plt.figure(figsize=(8, 5.2), layout="constrained")
    ax = fig.add_subplot()
    for m in methods:
        ks = sorted(k for (mm, k) in by if mm == m)
        stats = [_stats(by[(m, k)]) for k in ks]
        if not ks or (std_only and all(s["n_runs"] < 2 for s in stats)):
            continue
        n = _range([s["n_runs"] for s in stats])
        if std_only:
            ax.plot(ks, [s["std"] for s in stats], marker="o", label=f"{m} (n={n})")
        else:
            means = [s["mean"] for s in stats]
            line, = ax.plot(ks, means, marker="o", label=f"{m} (n={n})")
            if any(s["n_runs"] > 1 for s in stats):
                ax.fill_between(ks, [s["mean"] - s["std"] for s in stats], [s["mean"] + s["std"] for s in stats],
                                color=line.get_color(), alpha=0.2)
    ax.set_xlabel("k (target-language shots per language)")
    name = METRIC_LABEL[metric]
    ax.set_ylabel(f"std over seeds of the target-average {name}" if std_only else f"target-average {name}")
    all_k = sorted({k for (_m, k) in by})
    if all_k:
        ax.set_xticks(all_k)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower center", fontsize="small", ncols=2)
    else:
        ax.text(0.5, 0.5, "no method has more than one seed here", ha="center", va="center", transform=ax.transAxes)
    what = "std over seeds (stability)" if std_only else "mean over seeds, band = ±1 std"
    fit_title(fig, [f"{task}: target-average {name} against k ({what})",
                    f"targets {', '.join(targets)}; the source language is not in the average"])
    return fig


def _source_note(tasks: set[str]) -> str:
    """What the cells trained on, for the tasks the folder holds."""
    notes = []
    if "qa" in tasks or not tasks:
        notes.append("QA source: TyDi QA GoldP English train minus the source dev hold-out; k target shots per language from "
                     "MLQA dev, left out of the MLQA dev evaluation (counted below each MLQA table).")
    if "pawsx" in tasks:
        notes.append("PAWS-X source: the English PAWS-X dev rows, split by row index (the same half of the row ids is held out "
                     "as test rows in every language); the training rows and the source dev hold-out come from the other half.")
    return " ".join(notes) + " Every cell is one seed; n = the seeds per method.\n"


def _ablation_markdown(abl: list[dict[str, Any]]) -> str:
    if not abl:
        return "No ablation cells in this folder (a suite with recipe_* methods or its own variants has them).\n"
    lines = ["| task | k | method | change | n | of | mean ± std (min) | difference of the means | paired difference (seeds) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in abl:
        paired = "-" if a["paired_delta"] is None else f"{a['paired_delta']:+.1f} ({', '.join(map(str, a['paired_seeds']))})"
        lines.append(f"| {a['task']} | {a['k']} | {a['method']} | {a['change']} | {a['n_runs']} | {a['of']} | {_cell(a)} | {a['delta']:+.1f} "
                     f"| {paired} |")
    return "\n".join(lines) + "\n"


def _efficiency_markdown(eff: list[dict[str, Any]]) -> str:
    lines = ["| method | cells | train features/s | peak RSS MB | evaluation s per cell | wall s per cell | wall s, all its cells |",
             "|---|---|---|---|---|---|---|"]
    for e in eff:
        fps = "-" if e["features_per_s"] is None else f"{e['features_per_s']:.2f}"
        ev = "-" if e.get("eval_s") is None else f"{e['eval_s']:.1f}"
        lines.append(f"| {e['method']} | {e['cells']} | {fps} | {e['peak_rss_mb']:.0f} | {ev} | {e['wall_s']:.1f} | {e['wall_s_total']:.0f} |")
    return "\n".join(lines) + "\n"


def _replace_section(path: Path, name: str, body: str) -> None:
    """Write body into path between this suite's markers (replacing an earlier section), or append it."""
    begin, end = f"<!-- dsxfer reproduce {name}: begin -->", f"<!-- dsxfer reproduce {name}: end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_grid_report(results_dir: str | Path, output_dir: str | Path, *, plots: bool = True,
                      markdown_path: str | Path | None = None) -> dict[str, Any]:
    """Tables (per task, metric and k: mean ± std (min) over seeds, n, per language, the target average with
    the source apart), the ablation and cost tables and PNG charts of a `dsxfer reproduce` results folder."""
    import os

    results = Path(results_dir)
    grid = json.loads((results / GRID_FILE).read_text(encoding="utf-8")) if (results / GRID_FILE).is_file() else {}
    suite = grid.get("suite", {})
    cells = load_cells(results)
    order = list(suite.get("methods", [])) + list(suite.get("pawsx", {}).get("methods", []))
    rows = cell_rows(cells)
    tables = grid_tables(rows, order)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    if plots:
        plt = _pyplot()
        for k, ts in tables.items():
            for t in ts:
                if t.metric in ("f1", "accuracy"):
                    fig = bar_figure(t)
                    images.append(out / f"{t.task}_{t.metric}_k{k}_bars.png")
                    fig.savefig(images[-1], dpi=100)
                    plt.close(fig)
        for t in tables[max(tables)] if len(tables) > 1 else []:  # a curve against k needs two k at least
            if t.metric in ("f1", "accuracy") and t.targets:  # the curves are of the target average
                methods = [m for m in order if any(r["method"] == m for r in rows)] or t.methods
                for std_only, kind in ((False, "vs_k"), (True, "std_vs_k")):
                    fig = k_curve_figure(rows, t.task, t.metric, t.targets, methods, std_only=std_only)
                    images.append(out / f"{t.task}_{t.metric}_{kind}.png")
                    fig.savefig(images[-1], dpi=100)
                    plt.close(fig)
    abl = ablation_rows(cells, rows, tables)
    eff = efficiency_rows(cells, order)
    expected = grid.get("cells", [])
    done = {c["cell"] for c in cells}
    unfinished = [c for c in expected if c not in done]
    extra = sorted(done - set(expected)) if expected else []  # e.g. ablation cells run into the suite's folder
    name = suite.get("name", results.name)
    abouts = {c["method"]: c["spec"].get("about", c["method"]) for c in cells}
    md = [f"## dsxfer reproduce: suite {name}\n",
          (suite.get("about", "") + ". " if suite.get("about") else "")
          + (f"{len(expected) - len(unfinished)} of {len(expected)} cells finished" if expected else f"{len(cells)} cells finished")
          + (f" (not finished: {', '.join(unfinished[:6])}{' ...' if len(unfinished) > 6 else ''})" if unfinished else "")
          + (f", and {len(extra)} more cells of other grids in this folder ({', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''})"
             if extra else "")
          + f"; wall time of the finished cells {sum(c['wall_s'] for c in cells) / 60:.1f} min"
          + (f" on {grid['device']}" if grid.get("device") else "") + ".\n",
          _source_note({c["task"] for c in cells}),
          "| method | what it trains |", "|---|---|", *[f"| {m} | {abouts[m]} |" for m in sorted(abouts, key=lambda m: (order.index(m) if m in order else len(order), m))], ""]
    for k, ts in tables.items():
        md.append(f"### k = {k}\n")
        for t in ts:
            md.append(table_markdown(t))
            md.append(questions_note(rows, t.task, k) + "\n")
    md += ["### Ablations and variants\n", _ablation_markdown(abl), "### Cost per cell\n", _efficiency_markdown(eff)]
    text = "\n".join(md)
    (out / "report.md").write_text(text + ("\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n" if images else ""),
                                   encoding="utf-8")
    aggregate = [{**a, "k": k} for k, ts in tables.items() for a in long_format(ts)]
    doc = {"results_dir": str(results), "suite": name, "cells": len(cells), "unfinished": unfinished,
           "definition": {f"{t.task}/{t.metric}/k{k}": t.definition() for k, ts in tables.items() for t in ts},
           "aggregate": aggregate, "ablation": abl, "efficiency": eff}
    (out / "report.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
    if markdown_path is not None:
        target = Path(markdown_path)
        rel = os.path.relpath(out, target.parent if str(target.parent) else ".")
        _replace_section(target, name, text + "\n" + "\n".join(f"![{p.stem}]({rel}/{p.name})" for p in images))
    return {"markdown": text, "aggregate": aggregate, "tables": tables, "ablation": abl, "efficiency": eff,
            "images": [str(p) for p in images], "output_dir": str(out)}
