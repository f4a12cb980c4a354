"""The `dsxfer` command line.

Built on argparse rather than fire: argparse reads and checks every argument before a command starts,
so a misspelt flag stops the command before it does any work (fire binds arguments while it calls and
reported a leftover only after the command had run). Every flag has a help string; an unknown flag is
one line `dsxfer: error: ...` naming the closest valid flag, exit code 2, like every other user error
(`DsxferError`). Heavy imports happen inside the commands so `dsxfer --help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import difflib
import sys
from pathlib import Path
from collections.abc import Callable, Sequence

from dsxfer import __version__
from dsxfer.errors import DsxferError


class UsageError(DsxferError):
    """A command line that cannot run: unknown command or flag, missing or malformed value."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError (one line, exit 2 in main) instead of printing usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # one spelling per flag: no silent prefix matches
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{_where(self)}{message} (see {self.prog} --help)")


def _where(parser: argparse.ArgumentParser) -> str:
    """'eval: ' for `dsxfer eval`, '' for `dsxfer` itself: what an error line names after 'dsxfer: error: '."""
    command = parser.prog.removeprefix("dsxfer").strip()
    return f"{command}: " if command else ""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and appends a flag's default when it has a meaningful one."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=34, width=116)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        meaningful = default is not None and default is not argparse.SUPPRESS and not isinstance(default, bool) and default != []
        if action.option_strings and meaningful and "default" not in text:
            text += " (default: %(default)s)"
        return text


OVERRIDES_HELP = "dotted config overrides such as train.lr=1e-3 or alignment.target_langs=deu,fra (dsxfer config help lists every key)"


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)


# ------------------------------------------------------------------------------------ commands


def cmd_config_show(args: argparse.Namespace) -> None:
    from dsxfer.config import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")


def cmd_config_help(args: argparse.Namespace) -> None:
    from dsxfer.config import field_help

    rows = field_help()
    width = max(len(k) for k, _, _ in rows)
    for key, default, text in rows:
        print(f"{key:<{width}}  {text} (default {default})")


def cmd_train(args: argparse.Namespace) -> None:
    from dsxfer.config import load_config
    from dsxfer.training.train import train

    extra = list(args.overrides) + ([f"deepspeed.config={args.deepspeed}"] if args.deepspeed else [])
    summary = train(load_config(args.config, extra))
    print(f"done: {summary['step']} steps ({summary['stopped']}); outputs in {summary['output_dir']}")


def _eval_files(args: argparse.Namespace, config_files: list[str]) -> list[tuple[str, str]]:
    """(path, lang) pairs from --file/--lang (in order), else from the config's eval.files ('PATH:LANG')."""
    from dsxfer.evaluation.evaluate import parse_file_entry

    files, langs = args.file or [], args.lang or []
    if langs and not files:
        raise UsageError("eval: --lang names the language of a --file; for a benchmark task use --langs (e.g. --langs de,es)")
    if len(files) != len(langs):
        raise UsageError(f"eval: {len(files)} --file but {len(langs)} --lang: give one --lang after each --file, in order")
    if files:
        return list(zip(files, langs))
    return [parse_file_entry(entry, "eval.files") for entry in config_files]


def cmd_eval(args: argparse.Namespace) -> None:
    from dsxfer.config import load_config

    # the config (file + overrides) supplies every flag left out: eval.*, data.data_dir, data.on_error, model.name_or_path
    cfg = load_config(args.config, args.overrides)
    files = _eval_files(args, cfg.eval.files)
    if args.model and args.run_dir:
        raise UsageError("eval: give --model (a backbone with a fresh head) or --run_dir (a trained run), not both")
    if files and args.langs:
        raise UsageError("eval: --langs selects languages of a benchmark task; with --file give one --lang per file")
    task = args.task
    if task is None and not files:
        if len(cfg.eval.tasks) != 1:
            raise UsageError(f"eval: the config lists eval.tasks={cfg.eval.tasks}; pick one with --task")
        task = cfg.eval.tasks[0]
    from dsxfer.evaluation.evaluate import format_scores, run_eval

    def pick(flag, config_value):
        return config_value if flag is None else flag

    output_dir = pick(args.output_dir, "runs/eval")
    doc = run_eval(task, pick(args.langs, cfg.eval.langs), files=files, run_dir=args.run_dir,
                   model=pick(args.model, None if args.run_dir else cfg.model.name_or_path),
                   max_examples=pick(args.max_examples, cfg.eval.max_examples), output_dir=output_dir,
                   batch_size=pick(args.batch_size, cfg.eval.batch_size), seed=args.seed, data_dir=pick(args.data_dir, cfg.data.data_dir),
                   max_length=args.max_length, doc_stride=args.doc_stride, n_best=pick(args.n_best, cfg.eval.n_best),
                   max_answer_length=pick(args.max_answer_length, cfg.eval.max_answer_length),
                   on_error=pick(args.on_error, cfg.data.on_error))
    print(format_scores(doc))
    print(f"wrote {output_dir}/scores.json and " + ", ".join(r["predictions"] for r in doc["results"]))


def cmd_score(args: argparse.Namespace) -> None:
    from dsxfer.evaluation.evaluate import format_scores, score_predictions

    if args.task is None and args.file is None:
        raise UsageError("score: name the gold data: --task TASK --lang LANG, or --file PATH --lang LANG")
    doc = score_predictions(args.predictions, task=args.task, lang=args.lang, file=args.file, data_dir=args.data_dir,
                            on_error=args.on_error, output_dir=args.output_dir)
    print(format_scores(doc))
    (r,) = doc["results"]
    n_gold = r["n_examples"]
    if r["missing"]["count"]:
        print(f"missing: {r['missing']['count']} of {n_gold} gold ids have no prediction and score 0 (as in the official scripts), "
              f"e.g. {', '.join(r['missing']['examples'])}")
    if r["extra"]["count"]:
        print(f"extra: {r['extra']['count']} prediction(s) for ids not in the gold data were ignored, e.g. {', '.join(r['extra']['examples'])}")
    if args.output_dir:
        print(f"wrote {args.output_dir}/scores.json")


def cmd_prepare_model(args: argparse.Namespace) -> None:
    if args.model is not None:
        from dsxfer.method.backbone import load_backbone, load_tokenizer

        backbone, tokenizer = load_backbone(args.model), load_tokenizer(args.model)
        config = backbone.config
        print(f"model {args.model}: {type(backbone).__name__}, {sum(p.numel() for p in backbone.parameters()):,} parameters, "
              f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, vocabulary {len(tokenizer):,}")
        return
    from dsxfer.method.embedded import embedded_model_path, print_summary

    print_summary(embedded_model_path(args.cache, force=args.force))


def cmd_demo(args: argparse.Namespace) -> None:
    from dsxfer.config import load_config
    from dsxfer.demo import DEMO_SETTINGS, run_demo

    load_config(None, DEMO_SETTINGS + list(args.overrides))  # a bad override stops here, before any training
    run_demo(args.output_dir, *args.overrides)


def cmd_export(args: argparse.Namespace) -> None:
    from dsxfer.export import export_run

    for line in export_run(args.run_dir, args.output_dir):
        print(line)


def cmd_reproduce(args: argparse.Namespace) -> None:
    from dsxfer.reproduce import run_grid

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    out = args.out or f"runs/reproduce/{Path(args.suite).stem}"
    done = run_grid(args.suite, out, device=args.device, model=args.model, methods=methods, dry_run=args.dry_run)
    if done["failed"]:
        raise DsxferError(f"reproduce: {len(done['failed'])} cell(s) failed ({', '.join(done['failed'][:3])}); each cell's log.txt "
                          f"under {out}/cells says why; run the same command again to retry them")


def cmd_report(args: argparse.Namespace) -> None:
    from dsxfer.evaluation.report import is_results_folder, write_grid_report, write_report

    if len(args.run_dirs) == 1 and is_results_folder(args.run_dirs[0]):
        output_dir = args.output_dir or f"{args.run_dirs[0]}/report"
        result = write_grid_report(args.run_dirs[0], output_dir, plots=args.plots, markdown_path=args.markdown)
        print(result["markdown"])
        print(f"wrote {output_dir}/report.md, report.json" + (f" and {len(result['images'])} PNG charts" if result["images"] else "")
              + (f"; tables also in {args.markdown}" if args.markdown else ""))
        return
    if args.markdown:
        raise UsageError("report: --markdown writes the tables of a `dsxfer reproduce` results folder; give that folder alone")
    args.output_dir = args.output_dir or "runs/report"
    result = write_report(list(args.run_dirs), args.output_dir, plots=args.plots)
    print(result["markdown"])
    charts = len(result["images"]) + len(result.get("curves", []))
    print(f"wrote {args.output_dir}/report.md, report.csv, report.json" + (f" and {charts} PNG charts" if charts else ""))


# ------------------------------------------------------------------------------------- parser


def build_parser() -> _Parser:
    """Every command, flag and help text of `dsxfer`."""
    top = _Parser(prog="dsxfer", description="dsxfer: teach a pretrained multilingual model a new language or task from little data.",
                  epilog="`dsxfer COMMAND --help` explains every flag of a command.")
    top.add_argument("--version", action="version", version=f"dsxfer {__version__}", help="print the dsxfer version and exit")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", title="commands", parser_class=_Parser)
    _add_config_commands(sub)
    _add_train_commands(sub)
    _add_eval_commands(sub)
    _add_files_commands(sub)
    _add_grid_commands(sub)
    return top


def _command(parent: argparse._SubParsersAction, name: str, run: Callable[[argparse.Namespace], None] | None, summary: str,
             description: str = "") -> _Parser:
    p = parent.add_parser(name, help=summary, description=summary + ("\n\n" + description if description else ""))
    p.set_defaults(run=run, parser=p, takes_overrides=False)
    return p


def _add_config_commands(sub: argparse._SubParsersAction) -> None:
    """`dsxfer config show | config help`."""
    config = _command(sub, "config", None, "inspect configurations (show, help)")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", title="subcommands", parser_class=_Parser)
    p = _command(config_sub, "show", cmd_config_show, "print the resolved config: the YAML file (if any) plus dotted overrides")
    _add_overrides(p)
    p.add_argument("--config", metavar="PATH", help="a YAML config (configs/*.yaml); without it the defaults")
    p.set_defaults(takes_overrides=True)
    _command(config_sub, "help", cmd_config_help, "list every config key with its default and what it does")


def _add_train_commands(sub: argparse._SubParsersAction) -> None:
    """`dsxfer demo and train`."""
    p = _command(sub, "demo", cmd_demo, "few-shot cross-lingual QA demo on the embedded model: with vs. without alignment",
                "English TyDi QA + 8 MLQA shots per target language (de, es, zh), Tatoeba pairs for the alignment loss;\n"
                "evaluated on a fixed XQuAD subset. Prints the F1/EM table and writes report.md, PNG charts and\n"
                "TensorBoard logs under --output_dir.")
    _add_overrides(p)
    p.add_argument("-o", "--output_dir", default="runs/demo", metavar="DIR", help="where the two runs, the report and the charts go")
    p.set_defaults(takes_overrides=True)

    p = _command(sub, "train", cmd_train, "train as a config says (one process; launchers/train.py under deepspeed/torchrun/srun for more)",
                "Writes weights, checkpoints, train.log and TensorBoard logs into train.output_dir.")
    _add_overrides(p)
    p.add_argument("--config", metavar="PATH", help="a YAML config (configs/*.yaml); without it the defaults")
    p.add_argument("--deepspeed", metavar="PATH", help="a DeepSpeed JSON (ds_configs/zero*.json); without it ZeRO-0 built from the config")
    p.set_defaults(takes_overrides=True)


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """`dsxfer eval`."""
    p = _command(sub, "eval", cmd_eval, "evaluate a backbone or a trained run per language, or on your own files; write predictions and scores",
                "A benchmark task (--task, --langs) or your own test files (--file PATH --lang CODE, repeatable, or the\n"
                "config's eval.files): SQuAD-format .json, PAWS-X .tsv (with or without the header id/sentence1/sentence2/label)\n"
                "or .jsonl. Flags left out take the config's value (eval.*, data.data_dir, data.on_error, model.name_or_path).\n"
                "With --run_dir, rows the run trained on (its k shots in shots.json, its source rows in train_rows.json) are\n"
                "left out of the same task's evaluation and counted in the table and scores.json.\n"
                "Writes predictions_<lang or file>.json (official format) and scores.json into --output_dir and prints a table.")
    _add_overrides(p)
    p.add_argument("--config", metavar="PATH", help="a YAML config whose eval/data/model sections give the defaults of the flags below")
    p.add_argument("--task", metavar="TASK", help="xquad, mlqa or pawsx (default: the config's eval.tasks, xquad); with --file it "
                   "chooses the metric and marks the file as that benchmark's rows")
    p.add_argument("--langs", metavar="LIST", help="all, or a comma list of the task's languages (MLQA also context-question pairs "
                   "such as de-en) (default: the config's eval.langs, all)")
    p.add_argument("--file", action="append", metavar="PATH", help="your own test file (.json SQuAD format, .tsv PAWS-X, .jsonl); "
                   "repeatable, each followed by its --lang")
    p.add_argument("--lang", action="append", metavar="CODE", help="language of the preceding --file (names it in the table; "
                   "the MLQA metric's language with --task mlqa)")
    p.add_argument("--model", metavar="NAME_OR_PATH", help="an HF model name or folder with a fresh seeded head (default: the config's "
                   "model.name_or_path, else the embedded model)")
    p.add_argument("--run_dir", metavar="DIR", help="a trained run (its config.yaml and trainable.safetensors) instead of --model")
    p.add_argument("--max_examples", type=_positive_int, metavar="N", help="a fixed seeded subset of N rows per language or file "
                   "(default: the config's eval.max_examples, all)")
    p.add_argument("-o", "--output_dir", metavar="DIR", help="where predictions and scores.json go (default: runs/eval)")
    p.add_argument("--batch_size", type=_positive_int, metavar="N", help="features per batch (default: the config's eval.batch_size, 32)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the subset and of a fresh head")
    p.add_argument("--data_dir", metavar="DIR", help="benchmark data folder (default: data.data_dir, $DSXFER_DATA, ../shared/data)")
    p.add_argument("--max_length", type=_positive_int, metavar="N", help="tokens per feature (default: the run's model.max_length, else 384 "
                   "for QA and 128 for pairs)")
    p.add_argument("--doc_stride", type=_positive_int, metavar="N", help="overlap of QA windows in tokens (default: the run's, else min(128, max_length / 4))")
    p.add_argument("--n_best", type=_positive_int, metavar="N", help="start/end candidates per window when decoding (default: eval.n_best, 20)")
    p.add_argument("--max_answer_length", type=_positive_int, metavar="N", help="longest answer span in tokens (default: eval.max_answer_length, 30)")
    p.add_argument("--on_error", choices=("raise", "skip"), help="a bad record stops (raise) or is left out and counted in scores.json "
                   "(skip) (default: data.on_error, raise)")
    p.set_defaults(takes_overrides=True)


def _add_files_commands(sub: argparse._SubParsersAction) -> None:
    """`dsxfer score, export and prepare-model`."""
    p = _command(sub, "score", cmd_score, "score an existing prediction file with dsxfer's metrics (SQuAD v1.1 / MLQA EM and F1, accuracy)",
                "PREDICTIONS is the official format: {question_id: answer_text} for QA, {id: label} for classification.\n"
                "The gold data is a benchmark language (--task --lang) or your file (--file --lang). A gold id without\n"
                "a prediction scores 0, as in the official SQuAD script; missing and extra ids are counted and named.")
    p.add_argument("predictions", metavar="PREDICTIONS", help="the prediction JSON file")
    p.add_argument("--task", metavar="TASK", help="xquad, mlqa or pawsx: the gold data (with --lang) or, with --file, the metric")
    p.add_argument("--lang", required=True, metavar="CODE", help="language of the gold data (MLQA: also pairs such as de-en)")
    p.add_argument("--file", metavar="PATH", help="your own gold file (.json SQuAD format, .tsv PAWS-X, .jsonl) instead of a benchmark")
    p.add_argument("--data_dir", metavar="DIR", help="benchmark data folder (default: $DSXFER_DATA, ../shared/data)")
    p.add_argument("--on_error", choices=("raise", "skip"), default="raise", help="a bad gold record stops (raise) or is left out (skip)")
    p.add_argument("-o", "--output_dir", metavar="DIR", help="also write scores.json there (for dsxfer report)")

    p = _command(sub, "export", cmd_export, "export a trained run: trainable.safetensors + config.yaml and PEFT adapter folders where they map",
                "Soft prompt -> PROMPT_TUNING, LoRA -> LORA, prefixes in every layer -> PREFIX_TUNING (prefixes in some\n"
                "layers only stay in dsxfer's files). Each PEFT folder carries the tokenizer, head.safetensors and a\n"
                "README.md with the loading code.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the output_dir of a finished training run")
    p.add_argument("-o", "--output_dir", metavar="DIR", help="where the export goes (default: RUN_DIR/export)")

    p = _command(sub, "prepare-model", cmd_prepare_model, "build or check the embedded default model (or check that --model loads) and print its summary",
                "A cached folder that fails its manifest check is reported and rebuilt.")
    p.add_argument("--cache", metavar="DIR", help="cache root (default: $DSXFER_CACHE, else ~/.cache/dsxfer)")
    p.add_argument("--force", action="store_true", help="rebuild even when the cached folder is valid")
    p.add_argument("--model", metavar="NAME_OR_PATH", help="instead load this HF model and its tokenizer and summarise them")


def _add_grid_commands(sub: argparse._SubParsersAction) -> None:
    """`dsxfer reproduce and report`."""
    p = _command(sub, "reproduce", cmd_reproduce, "run a suite: methods x k shots x seeds, dsxfer against PEFT + the HF Trainer, one JSON per cell",
                "Suites: tiny (a tiny random model: checks the machinery in minutes), small (the embedded model, 3-4.5\n"
                "hours on 2 CPU cores), full (every method and k, 5 seeds), or a suite YAML/JSON file. Each cell trains and\n"
                "evaluates in its own process and writes <out>/cells/<cell>/result.json; finished cells are skipped, so the same\n"
                "command continues a stopped grid. Then `dsxfer report <out>` writes the tables and charts.\n\n"
                "A suite file has the fields of dsxfer/reproduce.py SUITES, and may define its own variants of a method\n"
                "(define: {name: {like: lora_recipe, overrides: [alignment.weight=0.25], lr: 1e-3}}) and score the source dev\n"
                "hold-out only (eval: {source_dev: {max_examples: 200}}): a tuning grid that never sees target test data, e.g.\n"
                "docs/results/tune/tune.yaml.")
    p.add_argument("--suite", required=True, metavar="NAME", help="tiny, small, full, or a suite .yaml/.json file")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where every cell trains and evaluates")
    p.add_argument("--out", metavar="DIR", help="the results folder (default: runs/reproduce/<suite>)")
    p.add_argument("--model", metavar="DIR", help="a model folder instead of the suite's model ('embedded', 'tiny' also accepted)")
    p.add_argument("--methods", metavar="LIST", help="run only these methods of the suite (comma list)")
    p.add_argument("--dry_run", action="store_true", help="list the cells that would run and stop")

    p = _command(sub, "report", cmd_report, "aggregate runs, or a `dsxfer reproduce` results folder, into per-language tables and PNG charts",
                "Runs whose config.yaml differ only in the seed are seeds of one method, named by what they trained:\n"
                "mean, std and min per language, and the average over the target languages (the source apart).\n"
                "Also writes a training-curve PNG per run. Given one results folder of `dsxfer reproduce`, the cells'\n"
                "result.json are aggregated per method and k instead (plus F1 against k, std against k, the ablation table).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders holding scores.json (from dsxfer eval), or one level up; "
                   "or one results folder of dsxfer reproduce")
    p.add_argument("-o", "--output_dir", metavar="DIR", help="where report.md/csv/json and the charts go (default: runs/report; "
                   "RESULTS/report for a results folder)")
    p.add_argument("--markdown", metavar="PATH", help="results folder only: also write the tables into this markdown file (e.g. "
                   "docs/RESULTS.md), replacing the suite's earlier section there")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write PNG charts (--no-plots: tables only)")


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings]


def _unknown_argument(parser: argparse.ArgumentParser, token: str) -> UsageError:
    """One line for an argument the command does not take, naming the closest valid flag."""
    flag = token.split("=", 1)[0]
    if not flag.startswith("-"):
        return UsageError(f"{_where(parser)}unexpected argument '{token}' (see {parser.prog} --help)")
    bare = flag.lstrip("-")
    if "." in bare and "=" in token:
        return UsageError(f"{_where(parser)}unknown flag '{flag}': dotted config overrides are written without dashes, e.g. {token.lstrip('-')}")
    valid = [s for s in _option_strings(parser) if s.startswith("--")]
    close = difflib.get_close_matches(flag, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "valid flags: " + ", ".join(valid)
    return UsageError(f"{_where(parser)}unknown flag '{flag}': {hint} (see {parser.prog} --help)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and check the whole command line; raises UsageError before any command runs."""
    top = build_parser()
    commands = {name: p for a in top._actions if isinstance(a, argparse._SubParsersAction) for name, p in a.choices.items()}
    if not argv:
        raise UsageError("no command given: choose one of " + ", ".join(commands) + " (see dsxfer --help)")
    if not argv[0].startswith("-") and argv[0] not in commands:
        close = difflib.get_close_matches(argv[0], list(commands), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else "choose one of " + ", ".join(commands)
        raise UsageError(f"unknown command '{argv[0]}': {hint} (see dsxfer --help)")
    args, extras = top.parse_known_args(argv)
    if args.command == "config" and args.config_command is None:
        raise UsageError("config: choose a subcommand: show or help (see dsxfer config --help)")
    if args.command is None:
        raise UsageError("no command given (see dsxfer --help)")
    # argparse leaves KEY=VALUE overrides that follow a flag unconsumed; anything else is an error
    for token in extras:
        if args.takes_overrides and not token.startswith("-") and "=" in token:
            args.overrides.append(token)
        else:
            raise _unknown_argument(args.parser, token)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(list(sys.argv[1:] if argv is None else argv))
        args.run(args)
    except DsxferError as e:
        print(f"dsxfer: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version print and exit 0
        return e.code if isinstance(e.code, int) else 0
    except BrokenPipeError:  # `dsxfer config help | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
