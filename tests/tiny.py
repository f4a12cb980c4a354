"""Tiny randomly initialised models, their tokenizers, and the configs and synthetic data the tests share.

Every test model is built here; tests import this module (and tests/launch.py), never each other.

- `tiny_backbone(arch, seed=..., **fields)`: a bare HF base model of one of ARCHS straight from its config
  (vocabulary 120, hidden 32, 2 layers, 4 heads; llama and qwen2 with 2 key/value heads so grouped-query
  attention is exercised); `fields` override config fields. It seeds the global RNG, as the tests expect.
- `tiny_backbone_and_tokenizer(arch)`: the same model sized to a small fast tokenizer of that
  architecture trained on Tatoeba lines (what conftest's `tiny_model_dir` saves).
- `encoder_tokenizer()`, `decoder_tokenizer()`, `char_tokenizer()`: XQuAD-trained and per-character
  tokenizers for featurization and evaluation; `subword_backbone(arch)` is a tiny model sized to them.
- `tiny_cfg`, `tiny_model(cfg)`, `qa_data`, `align_data`, `ds_json`: the training tests' TransferModel
  over a vocabulary-64 XLM-R and learnable synthetic QA and alignment batches.

bench/cpu_train.py --smoke and bench/peft_prefix_fidelity.py --tiny import this module too (checks of those
scripts, not measurements).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from dsxfer.errors import ConfigError, DsxferError

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("xlm-roberta", "bert", "llama", "qwen2")


# ------------------------------------------------------------------------------------------ backbones


def _classes(arch: str):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model, XLMRobertaConfig, XLMRobertaModel

    if arch not in ARCHS:
        raise ConfigError(f"tiny model arch is {arch!r}; use one of {', '.join(ARCHS)}")
    return {"xlm-roberta": (XLMRobertaConfig, XLMRobertaModel), "bert": (BertConfig, BertModel),
            "llama": (LlamaConfig, LlamaModel), "qwen2": (Qwen2Config, Qwen2Model)}[arch]


def tiny_backbone(arch: str = "xlm-roberta", *, seed: int = 0, pooler: bool = True, attn_implementation: str | None = None,
                  **fields: Any):
    """A tiny randomly initialised HF base model; torch.manual_seed(seed) right before it is built.
    `pooler=False` leaves out the encoders' pooling layer; `fields` are config fields, e.g. num_hidden_layers=3."""
    config_class, model_class = _classes(arch)
    defaults = config_class()
    for key in fields:
        if not hasattr(defaults, key):
            raise ConfigError(f"tiny_backbone({arch!r}): {config_class.__name__} has no field {key!r}")
    common: dict[str, Any] = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if arch == "xlm-roberta":
        common.update(max_position_embeddings=80, pad_token_id=1)
    elif arch == "bert":
        common.update(max_position_embeddings=80)
    else:
        common.update(num_key_value_heads=2)
    torch.manual_seed(seed)
    config = config_class(**{**common, **fields})
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    extra = {} if pooler or arch not in ("xlm-roberta", "bert") else {"add_pooling_layer": False}
    return model_class(config, **extra)


def tiny_backbone_and_tokenizer(arch: str, *, seed: int = 0, **fields: Any) -> tuple[Any, Any]:
    """(model, tokenizer): tiny_backbone sized to tiny_tokenizer(arch) (vocabulary, special ids, 512
    positions), eager attention, in eval mode; deterministic for a seed and leaves the global RNG alone."""
    tokenizer = tiny_tokenizer(arch)
    sized: dict[str, Any] = dict(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "xlm-roberta":
        sized.update(max_position_embeddings=514, type_vocab_size=1)  # positions start at pad id + 1
    elif arch == "bert":
        sized.update(type_vocab_size=2)
    elif arch == "qwen2":
        sized.update(use_sliding_window=False)
    with torch.random.fork_rng(devices=[]):
        model = tiny_backbone(arch, seed=seed, attn_implementation="eager", **{**sized, **fields})
    return model.eval(), tokenizer


def subword_backbone(arch: str = "xlm-roberta", **fields: Any) -> tuple[Any, Any]:
    """(model, tokenizer): a tiny xlm-roberta with encoder_tokenizer() or llama with decoder_tokenizer()
    (its eos as pad), 2 attention heads, seed 0."""
    if arch == "xlm-roberta":
        tokenizer = encoder_tokenizer()
        sized = dict(num_attention_heads=2, max_position_embeddings=520, pad_token_id=tokenizer.pad_token_id)
    elif arch == "llama":
        tokenizer = decoder_tokenizer()
        tokenizer.pad_token = tokenizer.eos_token
        sized = dict(num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                     pad_token_id=tokenizer.eos_token_id)
    else:
        raise ConfigError(f"subword_backbone arch is {arch!r}; use xlm-roberta or llama")
    return tiny_backbone(arch, vocab_size=len(tokenizer), **{**sized, **fields}), tokenizer


def save_tiny_folder(folder: str | Path, model, tokenizer) -> Path:
    """The model and its tokenizer saved as an HF folder that model.name_or_path can name."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return Path(folder)


# ------------------------------------------------------------------ tokenizers trained on Tatoeba lines


def _tatoeba_lines(lines_per_language: int = 300) -> list[str]:
    from dsxfer.data.tasks import resolve_data_dir

    folder = resolve_data_dir() / "tatoeba"
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
def trained_tokenizer_json(arch: str, vocab_size: int) -> str:
    """The trained tokenizers pipeline for an arch, serialized (each caller gets an independent copy)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = _SPECIALS[arch]["tokens"]
    corpus = _tatoeba_lines()
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

    _classes(arch)  # an unknown arch is one ConfigError
    specials = {k: v for k, v in _SPECIALS[arch].items() if k != "tokens"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(trained_tokenizer_json(arch, vocab_size)),
                                        model_max_length=512, **specials)
    # BERT segments pairs with token_type_ids; the others have no segment embeddings worth feeding
    tokenizer.model_input_names = (["input_ids", "token_type_ids", "attention_mask"] if arch == "bert"
                                   else ["input_ids", "attention_mask"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders have no pad token; batching needs one
    return tokenizer


# --------------------------------------------------------------- tokenizers trained on XQuAD text


SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]


def _xquad_text(articles_per_lang=8):
    from dsxfer.data import TASKS, resolve_data_dir

    for lang in TASKS["xquad"].langs:
        doc = json.loads((resolve_data_dir() / "xquad" / f"xquad.{lang}.json").read_text(encoding="utf-8"))
        for article in doc["data"][:articles_per_lang]:
            for para in article["paragraphs"]:
                yield para["context"]
                yield from (q["question"] for q in para["qas"])


@functools.cache
def _subword_model():
    """A small SentencePiece-style BPE (Metaspace pieces "▁word", as XLM-R and Llama use) trained on
    XQuAD text of all 12 languages."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(_xquad_text(), trainers.BpeTrainer(vocab_size=4000, special_tokens=SPECIALS))
    return tok


def encoder_tokenizer():
    """XLM-R layout: <s> question </s></s> context </s>, CLS = <s> at position 0."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_subword_model().to_str())
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def decoder_tokenizer(bos: bool = True):
    """Llama layout (<s> question context, no CLS, no pad) or, with bos=False, Qwen's (no specials at all)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_subword_model().to_str())
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", 0)])
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>",
                                   unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])


def char_tokenizer(texts=()):
    """Every non-space character is its own token, so every gold answer is a token span: the oracle
    for the offset-mapping round trip. Characters outside `texts` map to <unk> (ids rarely matter)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted({c for t in texts for c in t if not c.isspace()}):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex("."), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


# ------------------------------------------------------------------------------- method configs


def config(*overrides):
    """The default experiment config at a short window, alignment off (for models over tiny_backbone)."""
    from dsxfer.config import load_config

    return load_config(None, ["model.max_length=64", "model.doc_stride=16", "alignment.enabled=false", *overrides])


# ------------------------------------------------------------- training: model and synthetic data

VOCAB, SEQ, MARK = 64, 12, 7  # the training tests' vocabulary, window length and answer-marker token


def tiny_cfg(tmp_path: Path | None = None, **sections):
    """A config for a few fast steps: short prompts, constant LR, logging every step; `sections` update it."""
    from dsxfer.config import config_from_dict

    data = {
        "prompts": {"length": 3, "init": "random"},
        "injection": {"length": 2, "reparam": False},
        "alignment": {"enabled": False, "batch_size": 4, "max_length": 10},
        "model": {"max_length": 32, "doc_stride": 8},
        "train": {"micro_batch_size": 4, "max_steps": 10, "lr": 2e-2, "warmup_steps": 0, "scheduler": "constant",
                  "log_every": 1, "tensorboard": False, "output_dir": str(tmp_path or "runs/test"), "seed": 3},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


def tiny_model(cfg, ds: dict | None = None):
    """The real TransferModel over a vocabulary-64 XLM-R without dropout or pooler, built under ZeRO-3's
    construction context when `ds` asks for stage 3; the method's own parameters seeded by train.seed."""
    from dsxfer.method.model import TransferModel
    from dsxfer.training import engine as eng

    with eng.zero3_construction(ds or {}):
        backbone = tiny_backbone("xlm-roberta", pooler=False, vocab_size=VOCAB, max_position_embeddings=64,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        torch.manual_seed(cfg.train.seed)
        return TransferModel(backbone, cfg)


def qa_data(n: int = 32, seed: int = 0):
    """A learnable span task: the answer starts at the marker token and ends one token later."""
    from dsxfer.data.build import Batches

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, VOCAB, (n, SEQ), generator=g)
    starts = torch.randint(1, SEQ - 2, (n,), generator=g)
    ids[torch.arange(n), starts] = MARK
    lengths = torch.randint(SEQ - 3, SEQ + 1, (n,), generator=g)
    lengths = torch.maximum(lengths, starts + 2)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    ids = ids * mask + (1 - mask)  # pad id 1

    def make(idx):
        idx = torch.tensor(idx)
        return {"input_ids": ids[idx], "attention_mask": mask[idx], "start_positions": starts[idx],
                "end_positions": starts[idx] + 1}
    return Batches(n, make)


def align_data(n: int = 24, seed: int = 1):
    """(pair batches, probe batches per language): the target side is the source shifted by 3 ids."""
    from dsxfer.data.build import Batches

    g = torch.Generator().manual_seed(seed)
    src = torch.randint(8, VOCAB, (n, 8), generator=g)
    tgt = (src + 3) % VOCAB

    def make(idx):
        idx = torch.tensor(idx)
        ones = torch.ones(len(idx), 8, dtype=torch.long)
        return {"align_src_input_ids": src[idx], "align_src_attention_mask": ones, "align_tgt_input_ids": tgt[idx],
                "align_tgt_attention_mask": ones, "align_pair_ids": idx.clone()}
    probes = {"deu": make(list(range(0, 6))), "fra": make(list(range(6, 12)))}
    return Batches(n, make), probes


def ds_json(stage: int) -> dict:
    """The shipped DeepSpeed config ds_configs/zero<stage>.json."""
    return json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())


# ------------------------------------------------------------------ whole runs through train()


def squad_file(path, n: int):
    """A SQuAD-format file of n short questions (one paragraph each)."""
    paragraphs = []
    for i in range(n):
        context = f"The river number {i} flows through the old town and meets the sea near the harbour."
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": f"What does river {i} meet?",
                                                        "answers": [{"text": "the sea", "answer_start": context.index("the sea")}]}]})
    path.write_text(json.dumps({"data": [{"title": "rivers", "paragraphs": paragraphs}]}), encoding="utf-8")
    return path


def tiny_train_run(tmp_path, model_dir, *overrides, source_questions: int = 20):
    """A whole `train()` run (readers -> data assembly -> loop) on a tiny saved XLM-R and a small source file."""
    from dsxfer.config import load_config
    from dsxfer.training.train import train

    source = squad_file(tmp_path / "source.json", source_questions)
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", "model.max_length=64", "model.doc_stride=16", "prompts.length=2",
        "prompts.init=random", "injection.length=2", "injection.reparam=false", f"data.train_files={source}",
        "data.max_train_examples=32", "data.dev_examples=8", "eval.tasks=xquad", "eval.langs=en",
        "train.max_steps=2", "train.micro_batch_size=4", "train.warmup_steps=0", "train.log_every=1", "train.lr=2e-2",
        "train.tensorboard=false", f"train.output_dir={tmp_path / 'run'}", *overrides])
    return cfg, train(cfg, quiet=True)


# ------------------------------------------------------------------ the activation-cache tests' model




def dropout_backbone(layers: int = 4, seed: int = 0):
    """A tiny XLM-R with its default dropout (0.1): the rule that frozen layers below L run without
    dropout is what makes the two paths agree, so dropout must be on for the test to mean anything."""
    return tiny_backbone("xlm-roberta", seed=seed, pooler=False, num_hidden_layers=layers, vocab_size=VOCAB,
                         max_position_embeddings=64)


def method_cfg(tmp_path, cache: str, **sections):
    """The activation-cache tests' method: prefixes in the top 2 of 4 layers, layer 3 trainable (so layers 2-3 keep dropout), alignment on."""
    base = dict(prompts={"length": 0}, injection={"length": 2, "layers": "top_k", "top_k": 2, "reparam": False},
                freezing={"strategy": "top_k", "top_k": 1},
                alignment={"enabled": True, "batch_size": 4, "max_length": 10, "layers": [-1]},
                model={"max_length": 32, "doc_stride": 8, "activation_cache": cache})
    for key, value in sections.items():
        base.setdefault(key, {}).update(value)
    return tiny_cfg(tmp_path, **base)


def build(cfg, ds=None, layers: int = 4):
    from dsxfer.method.model import TransferModel
    from dsxfer.training import engine as eng

    with eng.zero3_construction(ds or {}):
        backbone = dropout_backbone(layers)
        torch.manual_seed(cfg.train.seed)
        return TransferModel(backbone, cfg)
