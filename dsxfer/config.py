"""Configuration: dataclasses are the single source of truth.

A config is YAML whose top-level keys are the sections below; anything left out takes the default
written here. Dotted overrides (`train.lr=3e-3`, `injection.layers=[10,11]`) are applied after the
file. Every key and value is checked: an unknown key names the closest valid one, a wrong type or
value names the field, the value and what is allowed. Nothing is hidden behind "auto".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from dsxfer.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name_or_path: str | None = _f(None, "HF model name or local folder; empty = the embedded default (multilingual-e5-small)")
    trust_remote_code: bool = _f(False, "allow custom model code from the model folder (off unless you trust it)")
    task: Literal["qa", "classification"] = _f("qa", "task head: extractive QA (start/end) or sentence-pair classification")
    num_labels: int = _f(2, "classes for the classification head", ge=2)
    max_length: int = _f(256, "maximum tokens per feature, soft-prompt virtual tokens included", gt=0)
    doc_stride: int = _f(64, "overlap in tokens between windows of a long QA context", ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype of the frozen backbone weights")
    head_init: Literal["torch", "normal"] = _f(
        "torch", "task head initialisation: torch's Linear default (uniform, +-1/sqrt(hidden)), or N(0, the backbone config's "
                 "initializer_range) with zero bias, as transformers' AutoModelFor* heads start")
    attention_dropout: bool = _f(
        False, "apply the backbone config's attention-probability dropout in training, as transformers' own attention does "
               "(off: dsxfer's attention applies none; on, attention runs through torch's SDPA, whose CPU path is then unfused)")
    activation_cache: Literal["auto", "disabled"] = _f(
        "auto", "auto: when the layers below the first trainable or prompted one are frozen (encoders), compute their output "
                "once per input row and run only the layers above it per step; disabled: always run the whole backbone")
    activation_cache_dir: str | None = _f(None, "also keep the cached states in this folder (checksummed shards), re-used by later "
                                                "runs and evaluations of the same backbone; None = memory only")
    activation_cache_max_mb: int = _f(2048, "memory the cached states may take; rows past it are recomputed per step", gt=0)


@dataclass
class PromptConfig:
    length: int = _f(16, "soft-prompt virtual tokens prepended to the input (0 disables)", ge=0)
    init: Literal["vocab", "text", "random"] = _f("vocab", "initialise from random vocabulary embeddings, from the tokens of init_text, or N(0, 0.02)")
    init_text: str = _f("", "text whose token embeddings initialise the soft prompt (init=text)")
    task_prompt: str | None = _f(None, "load a saved task prompt (a file written by a previous run) and keep it frozen")
    language_prompt: str | None = _f(None, "load a saved language prompt and compose it after the task prompt")


@dataclass
class InjectionConfig:
    length: int = _f(8, "prefix key/value vectors injected per chosen layer (0 disables)", ge=0)
    layers: Union[Literal["all", "top_k"], list[int]] = _f("all", "layers that get a prefix: all, top_k, or a list of layer indices")
    top_k: int = _f(4, "number of top layers when layers=top_k", gt=0)
    reparam: bool = _f(True, "produce prefixes through a small MLP (more stable training); merged away at export")
    reparam_hidden: int = _f(128, "hidden size of the reparameterisation MLP", gt=0)


@dataclass
class FreezingConfig:
    strategy: Literal["frozen", "top_k", "bias_only", "layernorm", "embeddings_frozen", "gradual"] = _f(
        "frozen", "which backbone parameters train: none, the top k layers, biases, LayerNorms, all but embeddings, or gradual unfreezing")
    top_k: int = _f(2, "layers unfrozen from the top for top_k, and the final count for gradual", ge=0)
    unfreeze_every: int = _f(100, "gradual: unfreeze one more layer from the top every this many optimizer steps", gt=0)


@dataclass
class AdapterConfig:
    lora: bool = _f(False, "add LoRA adapters (through peft) to the named modules")
    r: int = _f(8, "LoRA rank", gt=0)
    alpha: int = _f(16, "LoRA alpha", gt=0)
    dropout: float = _f(0.0, "LoRA dropout", ge=0.0, lt=1.0)
    target_modules: list[str] = _f(["query", "value"], "module names that get LoRA (e.g. query, value, q_proj, v_proj)")


@dataclass
class AlignmentConfig:
    enabled: bool = _f(True, "add the knowledge alignment loss on parallel sentence pairs")
    loss: Literal["cosine", "mse", "infonce", "kl"] = _f("cosine", "alignment loss form")
    level: Literal["pooled", "token"] = _f("pooled", "masked mean-pooled sentence vectors, or token level")
    layers: list[int] = _f([-1], "hidden-state layers compared (negative counts from the top; -1 = last)")
    temperature: float = _f(0.05, "InfoNCE / KL temperature", gt=0.0)
    weight: float = _f(1.0, "lambda: peak weight of the alignment loss", ge=0.0)
    warmup_steps: int = _f(0, "steps over which lambda rises linearly from 0 to weight", ge=0)
    decay: Literal["none", "linear", "cosine"] = _f("none", "lambda decay after warm-up, to 0 at the last step")
    source_lang: str = _f("eng", "source side of the parallel pairs (Tatoeba ISO 639-3 code)")
    target_langs: list[str] = _f(["deu"], "target sides of the parallel pairs (Tatoeba ISO 639-3 codes)")
    src_file: str | None = _f(None, "your own line-aligned source file (replaces Tatoeba)")
    tgt_file: str | None = _f(None, "your own line-aligned target file (replaces Tatoeba)")
    max_pairs: int = _f(1000, "parallel pairs used per target language", gt=0)
    batch_size: int = _f(16, "parallel pairs per alignment batch", gt=0)
    every: int = _f(1, "one alignment batch every this many task micro-batches", gt=0)
    max_length: int = _f(64, "maximum tokens of a parallel sentence", gt=0)
    teacher_cache: Literal["memory", "disk"] = _f("memory", "keep teacher vectors in memory, or also on disk (re-used by later runs)")
    preservation_weight: float = _f(0.0, "weight of the KL between prompted and unprompted outputs on source data (0 = off)", ge=0.0)


@dataclass
class DataConfig:
    data_dir: str | None = _f(None, "folder with the benchmark data; default $DSXFER_DATA, else ../shared/data")
    train_task: Literal["tydiqa", "mlqa", "xquad", "pawsx"] = _f("tydiqa", "source-language training task")
    source_lang: str = _f("en", "source language of the training data")
    train_files: list[str] = _f([], "your own training files (SQuAD JSON, PAWS-X TSV or JSONL) replacing the task's")
    max_train_examples: int | None = _f(1000, "cap on source training examples (None = all)", gt=0)
    shot_task: Literal["mlqa", "xquad", "pawsx", "tydiqa"] = _f("mlqa", "task the k target-language shots come from")
    target_langs: list[str] = _f(["de"], "target languages that get k shots")
    k_shot: int = _f(0, "labelled target-language examples per language (0 = zero-shot)", ge=0)
    dev_examples: int = _f(200, "source-language dev examples for early stopping", ge=0)
    on_error: Literal["raise", "skip"] = _f("raise", "on a bad record: stop with an error, or skip it and report the count and reasons")
    lexicon: str | None = _f(None, "bilingual lexicon TSV (source<TAB>target) for code-switched pseudo data")
    induce_lexicon: bool = _f(False, "induce the lexicon from the parallel pairs by embedding-based word alignment")
    codeswitch_prob: float = _f(0.0, "probability a source word is replaced by its translation (0 = no pseudo data)", ge=0.0, le=1.0)
    codeswitch_copies: int = _f(1, "code-switched copies added per source example", ge=0)
    translate_train: list[str] = _f([], "translate-train files added to the training data")


@dataclass
class TrainConfig:
    seed: int = _f(42, "random seed (data order, initialisation, sampling)", ge=0, le=2**32 - 1)
    output_dir: str = _f("runs/default", "where checkpoints, TensorBoard logs and the report go (one run per folder, locked while it runs)")
    overwrite: bool = _f(False, "allow a fresh run in a folder that holds other files or an earlier run's checkpoints (those are deleted)")
    max_steps: int = _f(100, "optimizer steps", gt=0)
    lr: float = _f(3e-3, "peak learning rate (AdamW: above 1 it only diverges)", ge=0.0, le=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0.0)
    scheduler: Literal["linear", "cosine", "constant"] = _f("linear", "learning-rate schedule after warm-up")
    warmup_steps: int = _f(10, "learning-rate warm-up steps", ge=0)
    micro_batch_size: int = _f(8, "task examples per micro-batch per rank", gt=0)
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step", gt=0)
    batching: Literal["length_grouped", "random"] = _f(
        "length_grouped", "task batch order: seeded random chunks sorted by length (little padding), or a plain seeded permutation")
    grad_clip: float = _f(1.0, "clip the gradient norm of trainable parameters (0 = off)", ge=0.0)
    eval_every: int = _f(0, "evaluate on the source-language dev set every this many steps (0 = only at the end)", ge=0)
    early_stopping_patience: int = _f(0, "stop after this many evaluations without improvement (0 = off)", ge=0)
    max_bad_steps: int = _f(5, "stop after this many steps skipped for a NaN/Inf loss", ge=0)
    log_every: int = _f(10, "log scalars every this many steps", gt=0)
    save_every: int = _f(0, "checkpoint every this many steps (0 = only at the end)", ge=0)
    keep_last: int = _f(2, "checkpoints kept", gt=0)
    resume: str | None = _f(None, "resume from a checkpoint folder, or 'auto' for the latest complete one")
    tensorboard: bool = _f(True, "write TensorBoard event files under output_dir/tb")


@dataclass
class DeepSpeedConfig:
    config: str | None = _f(None, "DeepSpeed JSON (ds_configs/zero*.json); None = ZeRO-0 built from this config")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "training precision; must agree with the DeepSpeed JSON")


@dataclass
class EvalConfig:
    tasks: list[str] = _f(["xquad"], "evaluation tasks: xquad, mlqa, pawsx, tydiqa")
    langs: Union[Literal["all"], list[str]] = _f("all", "languages to evaluate, or all of the task's")
    max_examples: int | None = _f(None, "evaluate at most this many examples per language (a fixed, seeded subset)", gt=0)
    batch_size: int = _f(32, "features per evaluation batch", gt=0)
    n_best: int = _f(20, "start/end candidates considered when decoding an answer span", gt=0)
    max_answer_length: int = _f(30, "longest answer span in tokens", gt=0)
    files: list[str] = _f([], "your own test files for dsxfer eval, each 'PATH:LANG' (SQuAD-format .json, PAWS-X .tsv with or "
                             "without header, .jsonl); scored per file and named in the table instead of a benchmark")


@dataclass
class ExperimentConfig:
    name: str = _f("experiment", "run name shown in reports")
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    injection: InjectionConfig = field(default_factory=InjectionConfig)
    freezing: FreezingConfig = field(default_factory=FreezingConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------------- validation


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


_MISMATCH = object()


def _coerce(value: Any, tp: Any) -> Any:
    """Return value converted to tp, or _MISMATCH. Strict: no str->int, no bool->int."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value if value in typing.get_args(tp) else _MISMATCH
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            return _MISMATCH
        (inner,) = typing.get_args(tp)
        items = [_coerce(v, inner) for v in value]
        return _MISMATCH if any(i is _MISMATCH for i in items) else items
    if tp is type(None):
        return None if value is None else _MISMATCH
    if tp is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _MISMATCH
        return _MISMATCH
    if tp is str:
        return value if isinstance(value, str) else _MISMATCH
    return value


def _unknown_key(where: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(valid)
    name = f"{where}.{key}" if where else key
    return ConfigError(f"unknown config key '{name}': {hint}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where or 'root'}' must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(where, str(key), list(fields))
        tp = hints[key]
        name = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, name)
            continue
        out = _coerce(value, tp)
        if out is _MISMATCH:
            raise ConfigError(f"config value {name}={value!r} is invalid: expected {_describe(tp)}")
        kwargs[key] = out
    return cls(**kwargs)


_BOUNDS = (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
           ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<="))


def _check_numbers(obj: Any, where: str = "") -> None:
    """Every number is finite and inside the bounds its field states (metadata gt / ge / lt / le)."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_numbers(value, f"{name}.")
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config value {name}={value} is invalid: must be a finite number")
        for key, holds, sign in _BOUNDS:
            if key in f.metadata and not holds(value, f.metadata[key]):
                raise ConfigError(f"config value {name}={value} is invalid: must be {sign} {f.metadata[key]}")


def _check_ranges(cfg: ExperimentConfig) -> None:
    """Values that have the right type but cannot work."""
    _check_numbers(cfg)
    out = cfg.train.output_dir.strip()
    if not out or Path(out).expanduser().resolve() == Path("/"):
        raise ConfigError(f"config value train.output_dir={cfg.train.output_dir!r} is invalid: "
                          "name a folder for this run (e.g. runs/my-run), not an empty or root path")
    if cfg.model.doc_stride >= cfg.model.max_length:
        raise ConfigError(
            f"config value model.doc_stride={cfg.model.doc_stride} is invalid: must be smaller than model.max_length={cfg.model.max_length}")
    if (cfg.alignment.src_file is None) != (cfg.alignment.tgt_file is None):
        raise ConfigError("alignment.src_file and alignment.tgt_file must be given together (one line-aligned file each)")


# ------------------------------------------------------------------------------------ loading


def _read_yaml_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _list_field_type(path: list[str]) -> Any | None:
    """The type of the config field at path when it can hold a list, else None (unknown keys are reported later)."""
    tp: Any = ExperimentConfig
    for part in path:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    options = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    return tp if any(typing.get_origin(o) is list for o in options) else None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-3' -> (['train', 'lr'], 0.003). The value is read as YAML.

    A list field also takes a comma list without brackets, as the command-line flags do:
    'alignment.target_langs=deu,fra' is ['deu', 'fra'], and a single value is a list of one
    ('injection.layers=11' -> [11]), unless the field takes that value as it is ('injection.layers=all').
    """
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. train.lr=3e-3)")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    value = _read_yaml_value(raw)
    list_type = _list_field_type(path)
    if list_type is not None and not isinstance(value, (list, dict)) and raw.strip() and _coerce(value, list_type) is _MISMATCH:
        pieces = [piece.strip() for piece in raw.split(",") if piece.strip()]
        # each item is read as YAML (10 -> 10), except one YAML would read as a mapping ('a: b'), kept as text
        value = [item if not isinstance(item := _read_yaml_value(piece), (list, dict)) else piece for piece in pieces]
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
        node[path[-1]] = value
    return data


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    cfg = _build(ExperimentConfig, data, "")
    _check_ranges(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config (or start from defaults when path is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (check the path; examples are in configs/)")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not UTF-8 text") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections (model:, train:, ...), got {type(loaded).__name__}")
        data = loaded or {}
    data = apply_overrides(data, list(overrides))
    return config_from_dict(data)


def field_help(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every field: the source of `dsxfer config help`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += field_help(tp, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            bounds = ", ".join(f"{sign} {f.metadata[key]}" for key, _, sign in _BOUNDS if key in f.metadata)
            text = f.metadata.get("help", "") + (f"; {bounds}" if bounds else "")
            rows.append((f"{prefix}{f.name}", repr(default), text))
    return rows
