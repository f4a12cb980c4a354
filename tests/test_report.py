"""Reports: multi-seed aggregation (mean, std, min) by method, per-language tables with the average,
md/csv/json files and PNG charts, and `dsxfer report` end to end."""

import csv
import json
import math

import pytest

from dsxfer.cli import main
from dsxfer.errors import DataError
from dsxfer.report import write_report


def write_run(path, method, seed, results, *, with_method=True):
    path.mkdir(parents=True)
    doc = {"method": method if with_method else None, "model": "tiny", "seed": seed, "task": results[0]["task"],
           "results": results}
    (path / "scores.json").write_text(json.dumps(doc), encoding="utf-8")
    if not with_method:
        (path / "config.yaml").write_text(f"name: {method}\ntrain:\n  seed: {seed}\n", encoding="utf-8")
    return path


def qa(lang, em, f1, n=1190, data="XQuAD"):
    return {"task": "xquad", "lang": lang, "metric": "squad", "exact_match": em, "f1": f1, "n_examples": n, "data": data}


@pytest.fixture
def runs(tmp_path):
    # method "prompt+align": 3 seeds; F1 de = 50, 60, 70 -> mean 60, std 10 (sample), min 50
    #                                   F1 zh = 40, 40, 43 -> mean 41, std sqrt(3), min 40
    # method "baseline": 1 seed, its name read from config.yaml (no method in scores.json)
    out = [
        write_run(tmp_path / "a1", "prompt+align", 1, [qa("de", 40, 50), qa("zh", 30, 40)]),
        write_run(tmp_path / "a2", "prompt+align", 2, [qa("de", 50, 60), qa("zh", 30, 40)]),
        write_run(tmp_path / "a3", "prompt+align", 3, [qa("de", 60, 70), qa("zh", 33, 43)]),
        write_run(tmp_path / "b1", "baseline", 1, [qa("de", 10, 20), qa("zh", 5, 10)], with_method=False),
    ]
    return out


def test_aggregation_by_hand(runs, tmp_path):
    result = write_report(runs, tmp_path / "report", plots=False)
    cells = {(a["method"], a["metric"], a["lang"]): a for a in result["aggregate"]}
    de = cells[("prompt+align", "f1", "de")]
    assert (de["mean"], de["std"], de["min"], de["n_runs"]) == (60.0, 10.0, 50.0, 3)
    zh = cells[("prompt+align", "f1", "zh")]
    assert zh["mean"] == pytest.approx(41.0) and zh["std"] == pytest.approx(math.sqrt(3)) and zh["min"] == 40.0
    # the average: per run (50+40)/2=45, (60+40)/2=50, (70+43)/2=56.5 -> mean 50.5, min 45,
    # std sqrt((5.5^2 + 0.5^2 + 6^2) / 2) = sqrt(33.25)
    avg = cells[("prompt+align", "f1", "avg")]
    assert avg["mean"] == pytest.approx(50.5) and avg["min"] == 45.0 and avg["std"] == pytest.approx(math.sqrt(33.25))
    base = cells[("baseline", "exact_match", "de")]
    assert (base["mean"], base["std"], base["n_runs"]) == (10.0, 0.0, 1)
    assert cells[("baseline", "f1", "avg")]["mean"] == pytest.approx(15.0)


def test_report_files_name_the_data_and_read_back(runs, tmp_path):
    out = tmp_path / "report"
    result = write_report(runs, out)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "### xquad: F1 on XQuAD; mean ± std (min) over 3 runs" in md
    assert "| method | de | zh | avg |" in md
    assert "| prompt+align | 60.0 ± 10.0 (min 50.0) | 41.0 ± 1.7 (min 40.0) | 50.5 ± 5.8 (min 45.0) |" in md
    assert "| baseline | 20.0 | 10.0 | 15.0 |" in md
    with open(out / "report.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["method"] == "prompt+align" and r["metric"] == "f1" and r["lang"] == "de")
    assert (float(row["mean"]), float(row["std"]), float(row["min"]), row["data"]) == (60.0, 10.0, 50.0, "XQuAD")
    doc = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert len(doc["per_run"]) == 4 * 2 * 2  # runs x languages x (EM, F1)
    avg = next(a for a in doc["aggregate"] if a["lang"] == "avg" and a["method"] == "prompt+align" and a["metric"] == "f1")
    assert avg["mean"] == pytest.approx(50.5) and avg["n_runs"] == 3
    # PNG charts: a grouped bar chart per language and a method x language heatmap per task/metric
    names = sorted(p.rsplit("/", 1)[-1] for p in result["images"])
    assert names == ["xquad_exact_match_bars.png", "xquad_exact_match_heatmap.png", "xquad_f1_bars.png", "xquad_f1_heatmap.png"]
    import matplotlib.image

    img = matplotlib.image.imread(out / "xquad_f1_heatmap.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.05


def test_subset_note_and_errors(tmp_path):
    run = write_run(tmp_path / "s", "m", 0, [qa("de", 1, 2, n=100, data="XQuAD subset of 100")])
    assert "F1 on XQuAD subset of 100" in write_report([run], tmp_path / "r", plots=False)["markdown"]
    with pytest.raises(DataError, match="r2_missing does not exist; pass folders written by dsxfer train / dsxfer eval"):
        write_report([tmp_path / "r2_missing"], tmp_path / "r2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no scores.json here or one level down; run `dsxfer eval"):
        write_report([tmp_path / "empty"], tmp_path / "r3")


def test_cli_report(runs, tmp_path, capsys):
    out = tmp_path / "cli_report"
    assert main(["report", *map(str, runs), "--output_dir", str(out), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "| prompt+align | 60.0 ± 10.0 (min 50.0)" in printed and "report.md" in printed
    assert (out / "report.csv").is_file() and not list(out.glob("*.png"))
    assert main(["report", str(tmp_path / "nothing")]) == 2
