"""The `dsxfer` command line (fire).

Every command is a function with a docstring; its first line is what `dsxfer --help` lists.
Heavy imports happen inside the commands so `dsxfer --help` stays instant.
A `DsxferError` (bad config, file or record) is printed as one line and exits with code 2.
"""

from __future__ import annotations

import sys

from dsxfer.errors import DsxferError


class ConfigCommands:
    """Inspect configurations."""

    def show(self, *overrides: str, config: str | None = None) -> None:
        """Print the resolved config: the file (if any) plus dotted overrides such as train.lr=1e-3."""
        from dsxfer.config import load_config

        print(load_config(config, overrides).to_yaml(), end="")

    def help(self) -> None:
        """List every config key with its default and what it does."""
        from dsxfer.config import field_help

        rows = field_help()
        width = max(len(k) for k, _, _ in rows)
        for key, default, text in rows:
            print(f"{key:<{width}}  {text} (default {default})")


class Commands:
    """dsxfer: teach a pretrained multilingual model a new language or task from little data.

    Commands:
      config          inspect configurations (show, help)
      demo            few-shot cross-lingual QA demo on the embedded model: with vs without alignment
      train           train as a config says (DeepSpeed engine; checkpoints, TensorBoard)
      export          export a trained run as safetensors + PEFT adapter folders
      prepare-model   build or check the embedded default model (or check that --model loads) and print its summary
      eval            evaluate a backbone or a trained run per language; write predictions and scores
      report          aggregate runs into per-language tables (md/csv/json) and PNG charts
    """

    def __init__(self) -> None:
        self.config = ConfigCommands()

    def eval(self, task: str = "xquad", langs: str = "all", model: str | None = None, run_dir: str | None = None,
             max_examples: int | None = None, output_dir: str = "runs/eval", batch_size: int = 32, seed: int = 0,
             data_dir: str | None = None, max_length: int | None = None, doc_stride: int | None = None,
             n_best: int = 20, max_answer_length: int = 30, on_error: str = "raise") -> None:
        """Evaluate a backbone or a trained run per language; write predictions and scores.

        --task xquad|mlqa|pawsx; --langs all or a comma list (MLQA also ctx-question pairs such as de-en);
        --model an HF name/folder (default: the embedded model) with a fresh seeded head, or --run_dir a
        trained run; --max_examples a fixed seeded subset per language; --n_best start/end candidates and
        --max_answer_length (tokens) for decoding; --on_error skip leaves bad records out (counted in
        scores.json). Writes predictions_<lang>.json and scores.json into --output_dir and prints a table.
        """
        from dsxfer.evaluate import format_scores, run_eval

        if isinstance(langs, (tuple, list)):  # fire parses "de,es" as a tuple
            langs = ",".join(str(x) for x in langs)
        doc = run_eval(task, langs, model=model, run_dir=run_dir, max_examples=max_examples, output_dir=output_dir,
                       batch_size=batch_size, seed=seed, data_dir=data_dir, max_length=max_length, doc_stride=doc_stride,
                       n_best=n_best, max_answer_length=max_answer_length, on_error=on_error)
        print(format_scores(doc))
        print(f"wrote {output_dir}/scores.json and predictions_<lang>.json")

    def prepare_model(self, cache: str | None = None, force: bool = False, model: str | None = None) -> None:
        """Build or check the embedded default model (or check that --model loads) and print its summary.

        --cache DIR: cache root (default $DSXFER_CACHE, else ~/.cache/dsxfer); --force: rebuild even when
        the cached folder is valid. A cached folder that fails its manifest check is reported and rebuilt.
        --model NAME_OR_FOLDER: instead load that HF model and its tokenizer and summarise them.
        """
        if model is not None:
            from dsxfer.backbone import load_backbone, load_tokenizer

            backbone, tokenizer = load_backbone(model), load_tokenizer(model)
            config = backbone.config
            print(f"model {model}: {type(backbone).__name__}, {sum(p.numel() for p in backbone.parameters()):,} parameters, "
                  f"{config.num_hidden_layers} layers, hidden size {config.hidden_size}, vocabulary {len(tokenizer):,}")
            return
        from dsxfer.embedded import embedded_model_path, print_summary

        print_summary(embedded_model_path(cache, force=force))

    def demo(self, *overrides: str, output_dir: str = "runs/demo") -> None:
        """Few-shot cross-lingual QA on the embedded model: train with and without alignment, compare per language.

        English TyDi QA + 8 MLQA shots per target language (de, es, zh), Tatoeba pairs for the alignment
        loss; evaluated on a fixed XQuAD subset. Prints the F1/EM table and writes report.md, PNG charts
        and TensorBoard logs under --output_dir. Dotted overrides (train.max_steps=20) change the budget.
        """
        from dsxfer.demo import run_demo

        run_demo(output_dir, *overrides)

    def train(self, *overrides: str, config: str | None = None, deepspeed: str | None = None) -> None:
        """Train as a config says (one process; use launchers/train.py under deepspeed/torchrun/srun for more).

        --config a YAML file (configs/*.yaml), --deepspeed a DeepSpeed JSON (ds_configs/zero*.json),
        then dotted overrides such as train.lr=1e-3. Writes weights, checkpoints, train.log and
        TensorBoard logs into train.output_dir.
        """
        from dsxfer.config import load_config
        from dsxfer.train import train

        extra = list(overrides) + ([f"deepspeed.config={deepspeed}"] if deepspeed else [])
        summary = train(load_config(config, extra))
        print(f"done: {summary['step']} steps ({summary['stopped']}); outputs in {summary['output_dir']}")

    def export(self, run_dir: str, output_dir: str | None = None) -> None:
        """Export a trained run: trainable.safetensors + config.yaml and PEFT adapter folders where they map.

        Soft prompt -> PROMPT_TUNING, LoRA -> LORA, prefixes in every layer -> PREFIX_TUNING (prefixes in some
        layers only stay in dsxfer's files). Each PEFT folder carries the tokenizer, head.safetensors and a
        README.md with the loading code. Writes into --output_dir (default <run_dir>/export) and prints what it wrote.
        """
        from dsxfer.export import export_run

        for line in export_run(run_dir, output_dir):
            print(line)

    def report(self, *run_dirs: str, output_dir: str = "runs/report", plots: bool = True) -> None:
        """Aggregate runs into per-language tables (md/csv/json) and PNG charts.

        RUN_DIR... folders holding scores.json (from dsxfer eval); runs whose config.yaml differ only in
        the seed are seeds of one method, named by what they trained: mean, std and min per language,
        the average over the target languages (source apart). Writes report.md, report.csv,
        report.json, PNG charts and a training-curve PNG per run into --output_dir.
        """
        from dsxfer.report import write_report

        result = write_report(list(run_dirs), output_dir, plots=plots)
        print(result["markdown"])
        charts = len(result["images"]) + len(result["curves"])
        print(f"wrote {output_dir}/report.md, report.csv, report.json" + (f" and {charts} PNG charts" if charts else ""))


def main(argv: list[str] | None = None) -> int:
    import os

    import fire

    os.environ.setdefault("PAGER", "cat")  # fire pages --help through less on a terminal
    try:
        fire.Fire(Commands(), command=argv, name="dsxfer")
    except DsxferError as e:
        print(f"dsxfer: error: {e}", file=sys.stderr)
        return 2
    except fire.core.FireExit as e:  # --help, or a usage error fire already printed
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
