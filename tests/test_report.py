"""Reports: one definition of the average (targets only, source apart), n in every table and chart,
error bars only when n > 1, method names derived from the run configs, a majority-class line on
classification charts, training curves from real TensorBoard files, titles that fit, and
`dsxfer report` / the demo report end to end."""

import csv
import json
import math
import re

import pytest

from dsxfer.cli import main
from dsxfer.config import load_config
from dsxfer.errors import DataError
from dsxfer.evaluation.report import (MAJORITY_METHOD, bar_figure, build_tables, describe_run, error_bars, heatmap_figure, load_runs,
                           read_run_config, read_training_curves, training_curve_figure, write_report,
                           write_training_curves)

BASELINE = "prefixes 8 in top 4 layers (MLP) + QA head; 8 shots; no alignment"


def write_scores(path, results, *, method=None, run_dir=None, seed=0):
    path.mkdir(parents=True, exist_ok=True)
    doc = {"method": method, "model": "tiny", "run_dir": str(run_dir) if run_dir else None, "seed": seed,
           "task": results[0]["task"], "results": results}
    (path / "scores.json").write_text(json.dumps(doc), encoding="utf-8")
    return path


def write_config(run, *overrides):
    """A run folder's config.yaml exactly as training writes it (the resolved config)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(load_config(None, list(overrides)).to_yaml(), encoding="utf-8")
    return run


def qa(lang, em, f1, n=1190, data="XQuAD"):
    return {"task": "xquad", "lang": lang, "metric": "squad", "exact_match": em, "f1": f1, "n_examples": n, "data": data}


BASELINE_CONFIG = ("prompts.length=0", "injection.layers=top_k", "injection.top_k=4", "alignment.enabled=false",
                   "data.k_shot=8", "name=baseline (prompts only)")


@pytest.fixture
def runs(tmp_path):
    # "prompt+align": 3 seeds without a run config (the scores' method name is kept; source en by default)
    #   F1 de = 50, 60, 70 -> mean 60, std 10 (sample), min 50;  zh = 40, 40, 43 -> mean 41, std sqrt(3)
    #   en (source) = 90, 80, 85: shown apart, never averaged
    # baseline: 1 run whose config.yaml says what it trained (its free-text name says something else)
    b1 = write_config(tmp_path / "b1", *BASELINE_CONFIG, "train.seed=1")
    return [
        write_scores(tmp_path / "a1", [qa("de", 40, 50), qa("zh", 30, 40), qa("en", 80, 90)], method="prompt+align", seed=1),
        write_scores(tmp_path / "a2", [qa("de", 50, 60), qa("zh", 30, 40), qa("en", 70, 80)], method="prompt+align", seed=2),
        write_scores(tmp_path / "a3", [qa("de", 60, 70), qa("zh", 33, 43), qa("en", 75, 85)], method="prompt+align", seed=3),
        write_scores(b1 / "eval", [qa("de", 10, 20), qa("zh", 5, 10), qa("en", 50, 60)], method="baseline (prompts only)",
                     run_dir=b1),
    ]


def test_average_is_over_the_targets_only_by_hand(runs, tmp_path):
    result = write_report(runs, tmp_path / "report", plots=False)
    cells = {(a["method"], a["metric"], a["lang"]): a for a in result["aggregate"]}
    de = cells[("prompt+align", "f1", "de")]
    assert (de["mean"], de["std"], de["min"], de["n_runs"], de["role"]) == (60.0, 10.0, 50.0, 3, "target")
    zh = cells[("prompt+align", "f1", "zh")]
    assert zh["mean"] == pytest.approx(41.0) and zh["std"] == pytest.approx(math.sqrt(3)) and zh["min"] == 40.0
    # the average of the TARGETS de, zh per run: (50+40)/2=45, (60+40)/2=50, (70+43)/2=56.5 -> mean 50.5, min 45,
    # std sqrt((5.5^2 + 0.5^2 + 6^2) / 2) = sqrt(33.25); with en it would be 60, 60, 66 -> 62
    avg = cells[("prompt+align", "f1", "avg")]
    assert avg["mean"] == pytest.approx(50.5) and avg["min"] == 45.0 and avg["std"] == pytest.approx(math.sqrt(33.25))
    assert avg["role"] == "avg" and avg["langs"] == "de,zh"
    en = cells[("prompt+align", "f1", "en")]
    assert (en["mean"], en["role"]) == (85.0, "source")
    base = cells[(BASELINE, "exact_match", "de")]
    assert (base["mean"], base["std"], base["n_runs"]) == (10.0, 0.0, 1)
    assert cells[(BASELINE, "f1", "avg")]["mean"] == pytest.approx(15.0)  # (20 + 10) / 2, not (20 + 10 + 60) / 3


def test_tables_state_the_average_and_n(runs, tmp_path):
    out = tmp_path / "report"
    result = write_report(runs, out)
    md = (out / "report.md").read_text(encoding="utf-8")
    definition = ("n = 1-3 runs (seeds) per method; avg = mean over the target languages de, zh; "
                  "source language en shown apart, not in the average")  # b1's config names en
    assert f"### xquad: F1 on XQuAD\n\n{definition}; cells: mean ± std (min) over the n runs." in md
    assert md.index("### xquad: F1") < md.index("### xquad: EM")
    assert "| method | n | de | zh | avg (de, zh) | en (source) |" in md
    assert "| prompt+align | 3 | 60.0 ± 10.0 (min 50.0) | 41.0 ± 1.7 (min 40.0) | 50.5 ± 5.8 (min 45.0) | 85.0 ± 5.0 (min 80.0) |" in md
    assert f"| {BASELINE} | 1 | 20.0 | 10.0 | 15.0 | 60.0 |" in md
    assert "prompts only" not in md  # the free-text name is not what the run trained
    with open(out / "report.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["method"] == "prompt+align" and r["metric"] == "f1" and r["lang"] == "de")
    assert (float(row["mean"]), float(row["std"]), float(row["min"]), row["data"], row["n_runs"]) == (60.0, 10.0, 50.0, "XQuAD", "3")
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert len(doc["per_run"]) == 4 * 3 * 2  # runs x languages x (EM, F1)
    assert doc["definition"]["xquad/f1"] == definition
    names = sorted(p.rsplit("/", 1)[-1] for p in result["images"])
    assert names == ["xquad_exact_match_bars.png", "xquad_exact_match_heatmap.png", "xquad_f1_bars.png", "xquad_f1_heatmap.png"]
    import matplotlib.image

    img = matplotlib.image.imread(out / "xquad_f1_heatmap.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.05


def test_charts_say_n_and_draw_error_bars_only_when_n_is_above_1(runs):
    import matplotlib.pyplot as plt

    table = next(t for t in build_tables(load_runs(runs)) if t.metric == "f1")
    assert error_bars(table, BASELINE, ["de", "zh", "avg"]) is None
    assert error_bars(table, "prompt+align", ["de", "zh", "avg"]) == pytest.approx([10.0, math.sqrt(3), math.sqrt(33.25)])
    fig = bar_figure(table)
    bars = {c.get_label(): c for c in fig.axes[0].containers}
    assert bars[f"{BASELINE} (n=1)"].errorbar is None
    assert bars["prompt+align (n=3)"].errorbar is not None
    # x groups: the targets, their average, then the source apart
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["de", "zh", "avg\n(de, zh)", "en\n(source)"]
    assert "n = 1-3 runs (seeds) per method" in fig._suptitle.get_text().replace("\n", " ")
    plt.close(fig)
    # a report of single runs only: no error bar anywhere, and the chart says n = 1
    single = next(t for t in build_tables(load_runs(runs[3:])) if t.metric == "f1")
    fig = bar_figure(single)
    assert all(c.errorbar is None for c in fig.axes[0].containers)
    assert "n = 1 run per method" in fig._suptitle.get_text()
    plt.close(fig)


def test_titles_and_legends_fit_inside_the_figure(tmp_path):
    import matplotlib.pyplot as plt

    long_data = "XQuAD rows held out of training (1190) subset of 100 / MLQA dev rows held out of training (1148)"
    run = write_config(tmp_path / "r", "prompts.length=16", "adapters.lora=true", "data.codeswitch_prob=0.3",
                       "alignment.loss=infonce", "alignment.target_langs=[deu,spa,cmn,fra,ita]")
    score = write_scores(run / "eval", [qa(x, 10, 20, data=long_data) for x in ("ar", "de", "el", "en", "es", "hi", "zh")],
                         run_dir=run)
    for t in build_tables(load_runs([score])):
        for build in (bar_figure, heatmap_figure):
            fig = build(t)
            fig.canvas.draw()
            width = fig.bbox.width
            for artist in [fig._suptitle, *fig.legends, *fig.axes[0].get_yticklabels()]:
                box = artist.get_window_extent()
                assert box.x0 >= 0 and box.x1 <= width, (build.__name__, artist)
            plt.close(fig)


def test_labels_are_derived_from_what_the_run_trained():
    from dsxfer.demo import _overrides

    def label(*overrides):
        return describe_run(load_config(None, list(overrides)).to_dict())

    demo = {run: label(*_overrides(__import__("pathlib").Path("runs/demo"), run, alignment, []))
            for run, alignment in (("baseline", False), ("method", True))}
    assert demo["baseline"] == BASELINE
    assert demo["method"] == "prefixes 8 in top 4 layers (MLP) + QA head; 8 shots; cosine alignment (deu,spa,cmn)"
    assert label("prompts.length=16", "injection.layers=[10,11]", "injection.reparam=false", "adapters.lora=true",
                 "adapters.r=4", "freezing.strategy=top_k", "alignment.loss=infonce", "alignment.target_langs=[fra]",
                 "alignment.preservation_weight=0.1", "data.codeswitch_prob=0.3") == (
        "soft prompt 16 + prefixes 8 in layers 10,11 + top 2 layers unfrozen + LoRA r4 (query,value) + QA head; "
        "zero-shot; infonce alignment (fra); KL preservation 0.1; pseudo data: code-switched p=0.3")
    assert label("prompts.length=0", "injection.length=0", "model.task=classification", "alignment.enabled=false") == (
        "classification head; zero-shot; no alignment")


def test_runs_are_grouped_by_config_not_by_name(tmp_path):
    # two seeds of one config (different names and output folders) are n = 2 of one method; the same
    # label with another learning rate is another method, told apart by the differing key
    dirs = []
    for name, seed, lr in (("x", 1, 0.01), ("y", 2, 0.01), ("z", 1, 0.003)):
        run = write_config(tmp_path / name, *BASELINE_CONFIG, f"train.seed={seed}", f"train.lr={lr}", f"name={name}",
                           f"train.output_dir={tmp_path / name}")
        dirs.append(write_scores(run / "eval", [qa("de", 10, 20 + seed), qa("en", 1, 2)], run_dir=run))
    table = next(t for t in build_tables(load_runs(dirs)) if t.metric == "f1")
    assert table.methods == [f"{BASELINE} [train.lr=0.01]", f"{BASELINE} [train.lr=0.003]"]
    assert table.n_runs == {f"{BASELINE} [train.lr=0.01]": 2, f"{BASELINE} [train.lr=0.003]": 1}
    assert table.cells[(f"{BASELINE} [train.lr=0.01]", "de")]["mean"] == 21.5
    # the source language comes from the run config: a German-source run averages over the others
    run = write_config(tmp_path / "de_source", "data.source_lang=de")
    doc = write_scores(run / "eval", [qa("de", 1, 50), qa("en", 1, 30), qa("zh", 1, 10)], run_dir=run)
    table = next(t for t in build_tables(load_runs([doc])) if t.metric == "f1")
    assert (table.source, table.targets, next(iter(table.avg.values()))["mean"]) == ("de", ["en", "zh"], 20.0)
    with pytest.raises(DataError, match="runs trained on different source languages"):
        build_tables(load_runs([doc, dirs[0]]))


def test_classification_chart_draws_the_majority_class_of_the_evaluated_labels(tmp_path):
    import matplotlib.pyplot as plt

    from dsxfer.data.tasks import load_task
    from dsxfer.evaluation.evaluate import run_eval, subset
    from tiny import save_tiny_folder, tiny_backbone_and_tokenizer

    folder = save_tiny_folder(tmp_path / "tiny", *tiny_backbone_and_tokenizer("xlm-roberta", seed=0))
    run_eval("pawsx", "en,de,es", model=str(folder), max_examples=40, output_dir=tmp_path / "eval", progress=False,
             batch_size=20)
    expected = {}
    for lang in ("en", "de", "es"):
        labels = [ex.label for ex in subset(load_task("pawsx", lang).items, 40, 0)]
        expected[lang] = 100 * max(labels.count(0), labels.count(1)) / len(labels)
    doc = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert {r["lang"]: r["majority_accuracy"] for r in doc["results"]} == pytest.approx(expected)

    result = write_report([tmp_path / "eval"], tmp_path / "report")
    table = result["tables"][0]
    assert table.majority == pytest.approx(expected)
    target_avg = (expected["de"] + expected["es"]) / 2
    assert f"| {MAJORITY_METHOD} (of the evaluated labels) | - | {expected['de']:.1f} | {expected['es']:.1f} | {target_avg:.1f} | {expected['en']:.1f} |" in result["markdown"]
    fig = bar_figure(table)
    majority = [c for c in fig.axes[0].collections if c.get_gid() == "majority"]
    assert [c.get_label() for c in majority][0] == "majority class (of the evaluated labels)"
    heights = [float(c.get_segments()[0][0][1]) for c in majority]  # per group: de, es, avg, en (source)
    assert heights == pytest.approx([expected["de"], expected["es"], target_avg, expected["en"]])
    plt.close(fig)


def test_classification_chart_without_label_counts_draws_chance(tmp_path):
    import matplotlib.pyplot as plt

    acc = [{"task": "pawsx", "lang": x, "metric": "accuracy", "accuracy": 55.0, "n_examples": 10, "data": "PAWS-X dev"}
           for x in ("de", "en")]
    table = build_tables(load_runs([write_scores(tmp_path / "old", acc, method="m")]))[0]
    assert table.majority == {} and "source language en (assumed: no run config)" in table.definition()
    fig = bar_figure(table)
    lines = [c for c in fig.axes[0].collections if c.get_gid() == "majority"]
    assert lines[0].get_label() == "chance (50%, label counts not recorded)"
    assert {float(c.get_segments()[0][0][1]) for c in lines} == {50.0}
    plt.close(fig)


def test_training_curves_from_a_real_runs_tensorboard_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dsxfer.data.build import TrainData
    from dsxfer.training.train import run_training
    from tiny import align_data, qa_data, tiny_cfg, tiny_model

    align, probes = align_data()
    cfg = tiny_cfg(tmp_path / "run", alignment={"enabled": True, "weight": 0.5},
                   train={"max_steps": 6, "log_every": 2, "tensorboard": True})
    run_training(cfg, tiny_model(cfg), TrainData(task=qa_data(), align=align, align_probes=probes), quiet=True)
    run = tmp_path / "run"
    series = read_training_curves(run)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert set(series) == {"loss/task", "loss/align", "align/cosine/deu", "align/cosine/fra"}
    assert series["loss/task"] == [(e.step, e.value) for e in acc.Scalars("loss/task")]
    assert [s for s, _ in series["align/cosine/deu"]] == [2, 4, 6]
    # the same run read back from train.log (its 4-decimal numbers) when there is no tb folder
    import shutil

    shutil.move(str(run / "tb"), str(tmp_path / "tb_moved"))
    from_log = read_training_curves(run)
    assert set(from_log) == set(series)
    for tag in series:
        assert [s for s, _ in from_log[tag]] == [s for s, _ in series[tag]]
        assert [v for _, v in from_log[tag]] == pytest.approx([v for _, v in series[tag]], abs=1e-3)
    shutil.move(str(tmp_path / "tb_moved"), str(run / "tb"))

    fig = training_curve_figure(series, "run", alignment=True)
    task_ax, align_ax, cos_ax = fig.axes
    assert list(task_ax.lines[0].get_ydata()) == [v for _, v in series["loss/task"]]
    assert sorted(line.get_label() for line in cos_ax.lines) == ["deu", "fra"]
    path = write_training_curves(run, tmp_path / "curves.png")
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[1] > 1000 and img.std() > 0.05
    # through the report: one curve PNG per run next to the charts
    scores = write_scores(run / "eval", [qa("de", 1, 2), qa("en", 3, 4)], run_dir=run)
    result = write_report([scores], tmp_path / "report")
    assert [p.rsplit("/", 1)[1] for p in result["curves"]] == ["curves_run.png"]
    assert "![curves_run](curves_run.png)" in result["markdown"]
    assert read_run_config(run)["alignment"]["enabled"] is True


def test_demo_report_has_one_average(tmp_path):
    from pathlib import Path

    from dsxfer.demo import _overrides, write_demo_report

    root = tmp_path / "demo"
    f1 = {"baseline": {"en": 40.0, "de": 10.0, "es": 12.0, "zh": 8.0}, "method": {"en": 35.0, "de": 11.0, "es": 13.0, "zh": 9.5}}
    eval_dirs = []
    for run, alignment in (("baseline", False), ("method", True)):
        folder = root / run
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(load_config(None, _overrides(root, run, alignment, [])).to_yaml())
        eval_dirs.append(write_scores(folder / "eval", [qa(x, v / 2, v, n=60, data="XQuAD subset of 60") for x, v in f1[run].items()],
                                      method=run, run_dir=folder))
    write_demo_report(root, eval_dirs, {"baseline train": 1.0}, 2.0)
    md = (root / "report.md").read_text()
    # baseline targets (10 + 12 + 8) / 3 = 10.0, method (11 + 13 + 9.5) / 3 = 11.17; with en: 17.5 and 17.1
    assert "| avg (de, es, zh) | 10.0 | 11.2 | +1.2 | 5.0 | 5.6 | +0.6 |" in md
    assert "| en (source, not in the average) | 40.0 | 35.0 | -5.0 |" in md
    assert f"| {BASELINE} | 1 | 10.0 | 12.0 | 8.0 | 10.0 | 40.0 |" in md
    for line in md.splitlines():
        if "avg" in line and line.startswith("| "):
            assert "(de, es, zh)" in line, line  # every average names the same three targets
    # every F1 average in the file agrees with the hand-computed target averages
    f1_table = md.split("### xquad: F1")[1].split("###")[0]
    avg_values = {float(row.split("|")[6]) for row in f1_table.splitlines() if row.startswith("| prefixes")}
    assert avg_values == {10.0, 11.2}
    assert "baseline: " + BASELINE in md and "prompts only" not in md
    assert sorted(Path(p).name for p in (root / "report.json").parent.glob("*.png")) == [
        "xquad_exact_match_bars.png", "xquad_exact_match_heatmap.png", "xquad_f1_bars.png", "xquad_f1_heatmap.png"]


def test_eval_table_prints_the_same_average(runs, capsys):
    from dsxfer.evaluation.evaluate import format_scores

    doc = json.loads((runs[0] / "scores.json").read_text())
    text = format_scores(doc)
    assert re.search(r"avg over the targets de, zh \(source en not included\): exact_match 35\.00, f1 45\.00", text)


def test_subset_note_and_errors(tmp_path):
    run = write_scores(tmp_path / "s", [qa("de", 1, 2, n=100, data="XQuAD subset of 100")], method="m")
    assert "F1 on XQuAD subset of 100" in write_report([run], tmp_path / "r", plots=False)["markdown"]
    with pytest.raises(DataError, match="r2_missing does not exist; pass folders written by dsxfer train / dsxfer eval"):
        write_report([tmp_path / "r2_missing"], tmp_path / "r2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no scores.json here or one level down; run `dsxfer eval"):
        write_report([tmp_path / "empty"], tmp_path / "r3")
    bad = tmp_path / "bad"
    write_scores(bad / "eval", [qa("de", 1, 2)], run_dir=bad)
    (bad / "config.yaml").write_text("- a list\n")
    with pytest.raises(DataError, match=r"bad/config.yaml: expected a mapping of config sections, got list"):
        write_report([bad / "eval"], tmp_path / "r4")


def test_cli_report(runs, tmp_path, capsys):
    out = tmp_path / "cli_report"
    assert main(["report", *map(str, runs), "--output_dir", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "| prompt+align | 3 | 60.0 ± 10.0 (min 50.0)" in printed and "report.md" in printed
    assert (out / "report.csv").is_file() and not list(out.glob("*.png"))
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_a_results_folder_names_the_source_of_the_tasks_it_holds():
    from dsxfer.evaluation.report import _source_note

    qa, pawsx, both = _source_note({"qa"}), _source_note({"pawsx"}), _source_note({"qa", "pawsx"})
    assert "TyDi QA" in qa and "PAWS-X" not in qa
    assert "PAWS-X dev rows" in pawsx and "TyDi" not in pawsx and "MLQA" not in pawsx
    assert "TyDi QA" in both and "PAWS-X dev rows" in both
