"""Frozen-activation cache: run the frozen bottom of an encoder once per input, not once per step.

When nothing below layer L is trainable or prompted (prefixes only in layers >= L, no input-level soft
prompt, no LoRA or unfrozen parameter below L, a freezing strategy that keeps layers < L frozen), the
hidden states entering layer L are a fixed function of the input row: the embeddings and layers < L run
in eval mode (no dropout, see `eval_below`) and nothing in them changes. `ActivationCache` computes
them the first time a row is seen (training windows, alignment pairs on both sides, evaluation windows:
the key is the row's content, so one cache serves every dataset) and from then on the model runs only
layers L.. (`TransferModel._encode` hands the forward to `ActivationCache.encode`).

Keys and storage:
  * a row's key is a hash of its real tokens (input ids and token type ids up to the attention mask's
    length). The states are a function of those ids and the backbone's weights only, so the tokenizer,
    the data and the featurization settings (max length, stride, reserved tokens) enter through the
    ids: another featurization gives other rows and therefore other keys.
  * the value is the (n_real, H) state of the real tokens in the backbone's dtype; padded positions are
    never stored (their states do not reach any real position of an encoder, and the QA logits of
    padded positions are masked out of the loss).
  * memory: a dict bounded by `model.activation_cache_max_mb`; rows past the bound are computed per step
    as without a cache (the log says how many).
  * disk (`model.activation_cache_dir`): a folder per (model, L, dtype, weight fingerprint) holding
    safetensors shards, each with a SHA-256 sidecar that is checked before the shard is used (a shard
    whose checksum does not match is ignored and its rows recomputed). Later runs with the same backbone
    and L re-use them: a grid of seeds and methods computes the frozen bottom once.

Only encoder backbones with `embeddings` + `encoder.layer` (BERT, XLM-R and their relatives, the
embedded default) are supported; for any other architecture `plan` says why the cache is off.
Under ZeRO-3 a forward gathers parameters collectively, so when one rank must compute rows below L every
rank runs that forward (the same rule as the alignment teacher).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsxfer.files import sha256_file
from dsxfer.method.freezing import is_adapter, layer_of

SHARD_BYTES = 64 * 2**20  # new rows are written to disk in shards of about this size


# ------------------------------------------------------------------------------ which layer


def lowest_open_layer(model: Any) -> tuple[int, str]:
    """(L, why): the lowest backbone layer that is trainable or prompted, and what opens it.

    L = 0 when the input itself is open (a soft prompt, trainable embeddings); L = num_layers when
    nothing in the backbone trains or is prompted (only the head learns).
    """
    cfg, num_layers = model.cfg, model.num_layers
    if model.prompt.length > 0:
        return 0, f"an input-level soft prompt ({model.prompt.length} virtual tokens) enters layer 0"
    candidates: list[tuple[int, str]] = [(num_layers, "nothing in the backbone trains or is prompted")]
    if model.injection is not None:
        low = min(model.injection.layers)
        candidates.append((low, f"prefixes start at layer {low}"))
    if cfg.freezing.strategy == "gradual":
        low = num_layers - cfg.freezing.top_k
        candidates.append((low, f"gradual unfreezing reaches layer {low}"))
    for name, param in model.backbone.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_of(name)
        what = "LoRA" if is_adapter(name) else "a trainable parameter"
        if layer is not None:
            candidates.append((layer, f"{what} in layer {layer} ({name})"))
        elif "embed" in name:
            candidates.append((0, f"{what} in the embeddings ({name})"))
        # anything else (a final norm) sits above the last layer
    return min(candidates, key=lambda c: c[0])


def eval_below(backbone: nn.Module, layer: int) -> None:
    """Put the embeddings and layers < `layer` in eval mode (no dropout): they are frozen, so their states
    are then the same function of the input at every step, cached or not."""
    for name, module in backbone.named_modules():
        index = layer_of(name + ".")
        if (index is not None and index < layer) or (index is None and "embed" in name.split(".")[0]):
            module.eval()


def _encoder_layers(backbone: nn.Module) -> nn.ModuleList | None:
    encoder = getattr(backbone, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if isinstance(layers, nn.ModuleList) and getattr(backbone, "embeddings", None) is not None:
        return layers
    return None


@dataclass
class Plan:
    start: int | None  # the first layer that runs on cached states; None = no cache
    note: str          # one line for the log: used from where, or why not


def plan(model: Any) -> Plan:
    """Whether `model` (a TransferModel) can run from cached states, from which layer, and why (not)."""
    cfg = model.cfg
    if cfg.model.activation_cache == "disabled":
        return Plan(None, "activation cache: disabled (model.activation_cache=disabled)")
    kind = type(model.backbone).__name__
    if model.decoder or _encoder_layers(model.backbone) is None:
        return Plan(None, f"activation cache: not used: {kind} is not an encoder with embeddings + encoder.layer "
                          "(the cache supports BERT / XLM-R style encoders so far)")
    start, why = lowest_open_layer(model)
    if start == 0:
        return Plan(None, f"activation cache: not used: nothing below layer 0 is fixed ({why})")
    hidden_indices = sorted({i % (model.num_layers + 1) for i in cfg.alignment.layers})
    if hidden_indices and hidden_indices[0] < start:
        return Plan(None, f"activation cache: not used: alignment.layers={cfg.alignment.layers} reads hidden state "
                          f"{hidden_indices[0]}, below the first open layer {start} ({why})")
    return Plan(start, f"activation cache: used: layers 0..{start - 1} of {model.num_layers} are frozen and unprompted "
                       f"({why}); their output is computed once per input row (eval mode) and only layers {start}.."
                       f"{model.num_layers - 1} run per step")


# ------------------------------------------------------------------------------------ cache


def row_key(ids: torch.Tensor, types: torch.Tensor | None) -> bytes:
    """Content key of one row's real tokens (ids and token types)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(ids.to(torch.int64).cpu().numpy().tobytes())
    if types is not None:
        h.update(b"|")
        h.update(types.to(torch.int64).cpu().numpy().tobytes())
    return h.digest()


def weight_fingerprint(modules: list[nn.Module]) -> str:
    """A digest of the frozen weights below L (each tensor's name, shape, dtype and raw bytes, gathered under
    ZeRO-3): a cache folder is only re-used by a backbone with the same bottom. Hashing the bytes as they are
    is exact and takes about 0.4 s for the embedded model's bottom (its 96M-entry embedding matrix included);
    a float64 copy of every tensor, summed, took 2.5 s, paid by the first forward of every run."""
    from dsxfer.method.prompts import _gathered

    h = hashlib.sha256()
    for m_index, module in enumerate(modules):
        for name, p in module.named_parameters():
            with _gathered(p):
                h.update(f"{m_index}.{name}:{tuple(p.shape)}:{p.dtype}|".encode())
                h.update(p.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


class ActivationCache:
    """States entering layer `start`, per input row; see the module docstring."""

    def __init__(self, start: int, *, model_id: str, max_mb: int, folder: str | Path | None = None):
        self.start = start
        self.model_id = model_id
        self.max_bytes = max_mb * 2**20
        self.rows: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = self.over_budget = 0
        self.skipped_shards: list[str] = []
        self._root = Path(folder) if folder else None
        self.dir: Path | None = None
        self._on_disk: dict[bytes, Path] = {}
        self._pending: dict[bytes, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards_written = 0

    # --- disk

    def open_folder(self, backbone: nn.Module) -> None:
        """Bind the on-disk cache to this backbone's bottom (model id, L, dtype, weight fingerprint) and index
        the shards whose checksum holds. Called once, before the first forward."""
        if self._root is None or self.dir is not None:
            return
        layers = _encoder_layers(backbone)
        bottom = [backbone.embeddings, *list(layers)[: self.start]]
        dtype = str(next(backbone.parameters()).dtype).removeprefix("torch.")
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.model_id).name or self.model_id)[:40]
        self.dir = self._root / f"{tag}-L{self.start}-{dtype}-{weight_fingerprint(bottom)}"
        import atexit

        atexit.register(self.flush)  # what an evaluation computed reaches the disk when the process ends
        from safetensors import safe_open

        for shard in sorted(self.dir.glob("*.safetensors")):
            sidecar = shard.with_suffix(".sha256")
            if not sidecar.is_file() or sidecar.read_text().strip() != sha256_file(shard):
                self.skipped_shards.append(shard.name)
                continue
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    self._on_disk[bytes.fromhex(name)] = shard

    def flush(self) -> None:
        """Write the rows computed since the last flush to a new shard (+ its checksum)."""
        if self.dir is None or not self._pending:
            return
        from safetensors.torch import save_file

        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"shard-{os.getpid()}-r{rank}-{self._shards_written:04d}"
        tmp = self.dir / f".{name}.tmp"
        save_file({k.hex(): v.contiguous() for k, v in self._pending.items()}, str(tmp),
                  metadata={"kind": "dsxfer-activation-cache", "model": self.model_id, "start_layer": str(self.start)})
        digest = sha256_file(tmp)
        shard = self.dir / f"{name}.safetensors"
        tmp.replace(shard)
        shard.with_suffix(".sha256").write_text(digest + "\n")
        for k in self._pending:
            self._on_disk[k] = shard
        self._pending.clear()
        self._pending_bytes = 0
        self._shards_written += 1

    def _from_disk(self, key: bytes) -> torch.Tensor | None:
        shard = self._on_disk.get(key)
        if shard is None:
            return None
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as f:
            return f.get_tensor(key.hex())

    # --- memory

    def lookup(self, key: bytes) -> torch.Tensor | None:
        value = self.rows.get(key)
        if value is None:
            value = self._from_disk(key)
            if value is not None:
                self._keep(key, value)
        return value

    def _keep(self, key: bytes, value: torch.Tensor) -> bool:
        size = value.numel() * value.element_size()
        if self.bytes + size > self.max_bytes:
            self.over_budget += 1
            return False
        self.rows[key] = value
        self.bytes += size
        return True

    def store(self, key: bytes, value: torch.Tensor) -> None:
        self._keep(key, value)
        if self.dir is not None and key not in self._on_disk and key not in self._pending:
            self._pending[key] = value
            self._pending_bytes += value.numel() * value.element_size()
            if self._pending_bytes >= SHARD_BYTES:
                self.flush()

    def summary(self) -> str:
        where = f"; on disk in {self.dir}" if self.dir is not None else ""
        over = f"; {self.over_budget} row(s) past model.activation_cache_max_mb were recomputed" if self.over_budget else ""
        bad = f"; ignored {len(self.skipped_shards)} shard(s) with a wrong checksum" if self.skipped_shards else ""
        return (f"activation cache: {len(self.rows)} rows ({self.bytes / 2**20:.1f} MB) in memory, entering layer {self.start}; "
                f"{self.hits} row lookups served, {self.misses} computed{over}{bad}{where}")

    # --- the forward

    def _lower(self, model: Any, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """States entering layer `start`: the backbone's own forward with its layer list cut to the first `start`."""
        backbone = model.backbone
        encoder = backbone.encoder
        full = encoder.layer
        kwargs = {"inputs_embeds": backbone.get_input_embeddings()(input_ids), "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        was_training = backbone.training
        eval_below(backbone, self.start)
        encoder.layer = nn.ModuleList(list(full)[: self.start])
        try:
            with torch.no_grad():
                return backbone(**kwargs).last_hidden_state
        finally:
            encoder.layer = full
            if was_training:
                backbone.train()
                eval_below(backbone, self.start)

    def entering_states(self, model: Any, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """(B, T, H) states entering layer `start` for a right-padded batch; padded positions are zero."""
        if self._root is not None and self.dir is None:
            self.open_folder(model.backbone)
        lengths = attention_mask.long().sum(1).tolist()
        keys = [row_key(input_ids[i, :n], None if token_type_ids is None else token_type_ids[i, :n])
                for i, n in enumerate(lengths)]
        found = [self.lookup(k) for k in keys]
        todo = [i for i, v in enumerate(found) if v is None]
        self.hits += len(keys) - len(todo)
        run = todo
        if model._peers_need_teacher(bool(todo)) and not todo:
            run = [0]  # ZeRO-3: a peer computes rows, so this rank joins the forward; the result is dropped
        if run:
            rows = torch.tensor(run, device=input_ids.device)
            width = max(lengths[i] for i in run)
            lower = self._lower(model, input_ids[rows, :width], attention_mask[rows, :width],
                                None if token_type_ids is None else token_type_ids[rows, :width])
            for j, i in enumerate(todo):
                value = lower[j, : lengths[i]].detach().clone()
                self.store(keys[i], value)
                found[i] = value
            self.misses += len(todo)
        batch, width = input_ids.shape
        first = found[0]
        out = torch.zeros(batch, width, first.shape[-1], dtype=first.dtype, device=input_ids.device)
        for i, value in enumerate(found):
            out[i, : lengths[i]] = value.to(input_ids.device)
        return out

    def encode(self, model: Any, input_ids, attention_mask, token_type_ids, *, hidden_states: bool):
        """The backbone forward of `TransferModel._encode` from cached states: layers start.. only.

        Returns an object with last_hidden_state and hidden_states (index i = the state after layer i - 1;
        indices below `start` are None, `plan` rules out alignment layers there)."""
        from transformers.modeling_outputs import BaseModelOutput

        h = self.entering_states(model, input_ids, attention_mask, token_type_ids)
        padding = attention_mask.bool()
        layer_mask = None if bool(padding.all()) else padding  # the form dsxfer's mask function hands the layers
        states = [None] * self.start + [h]
        for layer in list(model.backbone.encoder.layer)[self.start:]:
            h = layer(h, layer_mask)
            if isinstance(h, tuple):
                h = h[0]
            states.append(h)
        return BaseModelOutput(last_hidden_state=h, hidden_states=tuple(states) if hidden_states else None)


def build(model: Any) -> tuple[ActivationCache | None, str]:
    """The cache a TransferModel should use (None when it cannot) and the log line that says so."""
    p = plan(model)
    if p.start is None:
        return None, p.note
    cfg = model.cfg
    cache = ActivationCache(p.start, model_id=str(cfg.model.name_or_path or "embedded-default"),
                            max_mb=cfg.model.activation_cache_max_mb, folder=cfg.model.activation_cache_dir)
    where = f"kept in {cfg.model.activation_cache_dir}" if cfg.model.activation_cache_dir else "kept in memory"
    return cache, f"{p.note}; {where}, at most {cfg.model.activation_cache_max_mb} MB in memory"
