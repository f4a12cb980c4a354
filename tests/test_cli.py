"""The `dsxfer` command line as a user runs it: the installed console script in a subprocess.

A misspelt flag must stop every command before it does any work (no folder written, no model loaded),
with one line naming the closest valid flag and exit code 2.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsxfer.cli import build_parser

DSXFER = str(Path(sys.executable).parent / "dsxfer")  # the console script of this environment
REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t = time.perf_counter()
    r = subprocess.run([DSXFER, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    return r, time.perf_counter() - t


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("dsxfer: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


@pytest.mark.parametrize("args, suggestion", [
    (["eval", "--tsk", "xquad", "--output_dir", "{tmp}/eval"], "did you mean '--task'?"),
    (["eval", "--task", "xquad", "--max_exmples", "3", "--output_dir", "{tmp}/eval"], "did you mean '--max_examples'?"),
    (["export", "{tmp}/run", "--outptu_dir", "{tmp}/export"], "did you mean '--output_dir'?"),
    (["train", "--confg", "configs/demo.yaml", "train.output_dir={tmp}/train"], "did you mean '--config'?"),
    (["demo", "--output-dir", "{tmp}/demo"], "did you mean '--output_dir'?"),
    (["report", "{tmp}/run", "--noplots", "-o", "{tmp}/report"], "did you mean '--no-plots'?"),
    (["prepare-model", "--forse", "--cache", "{tmp}/cache"], "did you mean '--force'?"),
    (["score", "{tmp}/p.json", "--tsak", "xquad", "--lang", "de"], "did you mean '--task'?"),
    (["config", "show", "--confg", "configs/demo.yaml"], "did you mean '--config'?"),
    (["config", "help", "--all"], "unknown flag '--all'"),
])
def test_a_misspelt_flag_stops_before_any_work(tmp_path, args, suggestion):
    (tmp_path / "run").mkdir()
    r, seconds = _run(*[a.format(tmp=tmp_path) for a in args])
    err = _one_error_line(r)
    assert suggestion in err and f"dsxfer {args[0]}" in err, err
    assert r.stdout == ""
    # nothing was written: no output folder of any command, nothing inside the run folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and not any((tmp_path / "run").iterdir())
    assert seconds < 15, seconds  # argument checking only; a real evaluation or demo takes minutes


def test_dotted_override_written_as_a_flag_is_refused_without_printing_the_config():
    r, _ = _run("config", "show", "--train.lr=1e-3")
    err = _one_error_line(r)
    assert "unknown flag '--train.lr'" in err and "without dashes, e.g. train.lr=1e-3" in err
    assert r.stdout == ""


def test_a_bad_demo_override_stops_before_the_demo_starts(tmp_path):
    r, _ = _run("demo", "--output_dir", str(tmp_path / "demo"), "trian.max_steps=2")
    assert "unknown config key 'trian': did you mean 'train'?" in _one_error_line(r)
    assert not (tmp_path / "demo").exists()


def test_overrides_may_follow_flags():
    r, _ = _run("config", "show", "train.lr=0.001", "--config", "configs/demo.yaml", "train.max_steps=7")
    assert r.returncode == 0, r.stderr
    assert "lr: 0.001" in r.stdout and "max_steps: 7" in r.stdout


def test_unknown_and_old_command_spellings():
    err = _one_error_line(_run("prepare_model")[0])
    assert "unknown command 'prepare_model': did you mean 'prepare-model'?" in err
    assert "did you mean 'eval'?" in _one_error_line(_run("evl")[0])
    assert "no command given" in _one_error_line(_run()[0])
    assert "choose a subcommand: show or help" in _one_error_line(_run("config")[0])


def test_bad_values_are_one_line():
    assert "argument --max_examples: must be > 0, got 0" in _one_error_line(_run("eval", "--max_examples", "0")[0])
    assert "argument --on_error: invalid choice: 'ignore'" in _one_error_line(_run("eval", "--on_error", "ignore")[0])
    assert "unexpected argument 'extra'" in _one_error_line(_run("export", "run", "extra")[0])
    assert "the following arguments are required: --lang" in _one_error_line(_run("score", "p.json", "--task", "xquad")[0])


def test_version_is_the_installed_package_version():
    r, _ = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dsxfer {importlib.metadata.version('dsxfer')}"
    r = subprocess.run([sys.executable, "-m", "dsxfer.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"dsxfer {importlib.metadata.version('dsxfer')}"


def test_help_lists_each_command_once_and_explains_every_flag():
    r, _ = _run("--help")
    assert r.returncode == 0
    commands = ["config", "demo", "train", "eval", "score", "export", "prepare-model", "report", "reproduce"]
    for name in commands:
        assert sum(line.split()[0] == name for line in r.stdout.splitlines() if line.strip()) == 1, (name, r.stdout)
    assert "prepare_model" not in r.stdout and "--version" in r.stdout
    for args in [[c] for c in commands if c != "config"] + [["config", "show"], ["config", "help"]]:
        text = _run(*args, "--help")[0].stdout
        # fire's section headings and typing reprs are gone
        assert not {"NAME", "SYNOPSIS", "DESCRIPTION", "FLAGS", "POSITIONAL ARGUMENTS"} & {line.strip() for line in text.splitlines()}
        for noise in ("Optional[", "str | None", "NoneType", "Type:"):
            assert noise not in text, (args, noise)
        assert text.startswith(f"usage: dsxfer {' '.join(args)}")
    # every flag and positional of every command carries a help string
    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                stack += list(action.choices.values())
            elif action.dest != "help":
                assert action.help and len(action.help) > 10, (p.prog, action.dest)
    eval_help = _run("eval", "--help")[0].stdout
    for flag in ("--file PATH", "--lang CODE", "--run_dir DIR", "--task TASK", "--config PATH"):
        assert flag in eval_help


def test_comma_lists_in_overrides_and_flags():
    r, _ = _run("config", "show", "alignment.target_langs=deu,fra", "injection.layers=10,11", "eval.files=a.json:de,b.tsv:fr")
    assert r.returncode == 0, r.stderr
    assert "target_langs:\n  - deu\n  - fra\n" in r.stdout
    assert "layers:\n  - 10\n  - 11\n" in r.stdout
    assert "files:\n  - a.json:de\n  - b.tsv:fr\n" in r.stdout


def test_a_reader_that_stops_early_gets_no_traceback():
    """`dsxfer config help | head -1`: the pipe closes after one line; dsxfer exits 0 and quietly."""
    proc = subprocess.Popen([sys.executable, "-m", "dsxfer.cli", "config", "help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and first.startswith(b"name")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
