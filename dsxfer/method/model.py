"""TransferModel: a frozen multilingual backbone + soft prompt + injected prefixes + task head (+ LoRA).

forward(batch) -> {loss, task_loss, align_loss, preserve_loss, align_weight, start_logits/end_logits |
logits}. A batch may hold task keys (input_ids, attention_mask, [token_type_ids], start_positions /
end_positions | labels), alignment keys (align_src_*, align_tgt_*, align_pair_ids), or both. A pair batch
also gives `align_cosine`; with alignment.enabled=false it is only measured (the probes of the training
log), never part of the loss.
The soft prompt's virtual tokens are prepended here and cut off again before the head: every logit
refers to a REAL token position, so featurization and post-processing never see virtual positions.

loss = task_loss + lambda(step) * align_loss + preservation_weight * preserve_loss, where lambda follows
the alignment schedule (call `set_step` once per optimizer step).

Run folder contract (shared with training and evaluation): <run_dir>/config.yaml (the resolved
ExperimentConfig) and <run_dir>/trainable.safetensors (dsxfer.method.trainable).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsxfer.method import alignment as align
from dsxfer.method import trainable
from dsxfer.method import dropout as cpu_dropout
from dsxfer.method.trainable import PROMPT_FILE, TRAINABLE_FILE  # noqa: F401  (the run folder's file names)
from dsxfer.config import ExperimentConfig
from dsxfer.errors import ConfigError, DataError
from dsxfer.method.freezing import GradualUnfreezer, freeze_backbone, trainable_summary
from dsxfer.method.heads import ClassificationHead, QAHead, pool_for_classification, qa_loss
from dsxfer.method.prompts import (ComposedPrompt, PromptInjection, SoftPrompt, active_prefixes, resolve_layers,
                            use_prefix_attention, vocabulary_init)

CONFIG_FILE = "config.yaml"

_MASKED = -1e4  # finite "minus infinity" for KL over masked positions: exp() is 0 and differences stay finite


# ------------------------------------------------------------------------------------ checks


def is_decoder_backbone(backbone: nn.Module) -> bool:
    """True when the self-attention is causal (Llama, Qwen2, ...), False for encoders (XLM-R, BERT)."""
    for module in backbone.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "is_causal"):
            return bool(module.is_causal)
    return bool(getattr(backbone.config, "is_decoder", False))


def _module_leaf_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def validate_method_config(cfg: ExperimentConfig, backbone: nn.Module) -> None:
    """Fail before training on method settings this backbone cannot run, with the field and the fix."""
    num_layers = backbone.config.num_hidden_layers
    if cfg.injection.length > 0:
        resolve_layers(cfg.injection.layers, num_layers, cfg.injection.top_k)
    if cfg.alignment.enabled or cfg.alignment.preservation_weight > 0:
        align.check_loss(cfg.alignment.loss, cfg.alignment.level)
    # checked with the alignment loss off too: the probe cosines in the training log compare these layers
    for i in cfg.alignment.layers:
        if not -(num_layers + 1) <= i <= num_layers:
            raise ConfigError(
                f"config value alignment.layers={cfg.alignment.layers} is invalid: layer {i} does not exist "
                f"(hidden states are 0 = embeddings .. {num_layers} = last layer, or -1 .. -{num_layers + 1})")
    if cfg.freezing.strategy in ("top_k", "gradual") and not 0 <= cfg.freezing.top_k <= num_layers:
        raise ConfigError(f"config value freezing.top_k={cfg.freezing.top_k} is invalid: this backbone has {num_layers} layers")
    if cfg.adapters.lora:
        names = _module_leaf_names(backbone)
        missing = [t for t in cfg.adapters.target_modules if t not in names]
        if missing or not cfg.adapters.target_modules:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(
                f"config value adapters.target_modules={cfg.adapters.target_modules} is invalid: "
                f"{missing or 'empty'} not in this model; its linear modules are: {', '.join(linear)}")
    total_virtual = cfg.prompts.length + sum(_prompt_file_length(p) for p in (cfg.prompts.task_prompt, cfg.prompts.language_prompt) if p)
    if total_virtual >= cfg.model.max_length:
        raise ConfigError(
            f"config value prompts.length={cfg.prompts.length} is invalid: {total_virtual} virtual tokens leave no room "
            f"for real tokens in model.max_length={cfg.model.max_length}")
    limit = getattr(backbone.config, "max_position_embeddings", None)
    if limit is not None and cfg.model.max_length > limit:
        raise ConfigError(f"config value model.max_length={cfg.model.max_length} is invalid: this backbone takes at most {limit} positions")


def _prompt_file_length(path: str) -> int:
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise DataError(f"prompt file not found: {p} (prompts.task_prompt / prompts.language_prompt must name a file written by a previous run)")
    with safe_open(str(p), framework="pt") as f:
        return f.get_slice("embeddings").get_shape()[0]


# ------------------------------------------------------------------------------------- model


class TransferModel(nn.Module):
    def __init__(self, backbone: nn.Module, config: ExperimentConfig, tokenizer: Any = None, *,
                 model_id: str | None = None):
        super().__init__()
        validate_method_config(config, backbone)
        self.cfg = config
        self.tokenizer = tokenizer
        self.decoder = is_decoder_backbone(backbone)
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # our heads never read it; dropping it keeps every trainable param in use
        hidden = backbone.config.hidden_size
        self.num_layers = backbone.config.num_hidden_layers

        if config.adapters.lora:
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(r=config.adapters.r, lora_alpha=config.adapters.alpha, lora_dropout=config.adapters.dropout,
                              target_modules=list(config.adapters.target_modules))
            backbone = inject_adapter_in_model(lora, backbone)
        self.backbone = backbone
        # Freezing after LoRA: peft's injection marks only adapters trainable; the strategy then decides
        # the backbone's own parameters, adapters stay trainable.
        self.unfreezer: GradualUnfreezer | None = freeze_backbone(
            backbone, config.freezing.strategy, top_k=config.freezing.top_k,
            unfreeze_every=config.freezing.unfreeze_every, num_layers=self.num_layers)
        if self.unfreezer is not None:
            self.unfreezer.prefix = "backbone."

        parts: dict[str, SoftPrompt] = {}
        if config.prompts.task_prompt:
            parts["task"] = SoftPrompt.load(config.prompts.task_prompt, hidden)
        if config.prompts.language_prompt:
            parts["language"] = SoftPrompt.load(config.prompts.language_prompt, hidden)
        if config.prompts.length > 0:
            parts["trainable"] = SoftPrompt(config.prompts.length, hidden, self._prompt_init(config, hidden))
        self.prompt = ComposedPrompt(parts)

        self.injection = None
        if config.injection.length > 0:
            layers = resolve_layers(config.injection.layers, self.num_layers, config.injection.top_k)
            self.injection = PromptInjection(backbone.config, config.injection.length, layers,
                                             reparam=config.injection.reparam, reparam_hidden=config.injection.reparam_hidden)
        use_prefix_attention(backbone, attention_dropout=config.model.attention_dropout)

        if config.model.task == "qa":
            self.head = QAHead(hidden)
        else:
            self.head = ClassificationHead(hidden, config.model.num_labels)
        if config.model.head_init == "normal":  # transformers' _init_weights for the Linear layers of a task head
            std = float(getattr(backbone.config, "initializer_range", 0.02))
            for layer in self.head.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=std)
                    nn.init.zeros_(layer.bias)

        # The teacher cache exists with the alignment loss off too: the probe cosines of the training log
        # compare against the same teacher vectors. Only the alignment loss keeps them on disk.
        disk = config.alignment.enabled and config.alignment.teacher_cache == "disk"
        cache_dir = Path(config.train.output_dir) / "teacher_cache" if disk else None
        self.teacher_cache = align.TeacherCache(model_id or str(config.model.name_or_path or "embedded-default"),
                                                config.alignment.layers, cache_dir)
        self.step = 0
        # Below the first trainable or prompted layer the backbone is frozen: it runs in eval mode (train())
        # and, where the architecture allows, from cached states (dsxfer.method.cache)
        from dsxfer.method import cache as activation_cache

        self.first_open_layer, _ = activation_cache.lowest_open_layer(self)
        self.activation_cache, self.activation_cache_note = activation_cache.build(self)
        # CPU training draws its dropout masks from a quarter of the random bits torch's dropout uses (dsxfer.method.dropout)
        cpu_dropout.install(self)

    # --- construction helpers

    def _prompt_init(self, cfg: ExperimentConfig, hidden: int) -> torch.Tensor | None:
        n = cfg.prompts.length
        generator = torch.Generator().manual_seed(cfg.train.seed)
        if cfg.prompts.init == "random":
            return torch.randn(n, hidden, generator=generator) * 0.02
        embedding = self.backbone.get_input_embeddings()
        if cfg.prompts.init == "text":
            if self.tokenizer is None or not cfg.prompts.init_text:
                raise ConfigError("config value prompts.init='text' needs prompts.init_text and a tokenizer: set prompts.init_text or use prompts.init=vocab")
            ids = self.tokenizer(cfg.prompts.init_text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"config value prompts.init_text={cfg.prompts.init_text!r} gives no tokens: write some words")
            return vocabulary_init(embedding, n, token_ids=ids)
        return vocabulary_init(embedding, n, generator=generator)

    @property
    def num_virtual_tokens(self) -> int:
        """Positions the soft prompt takes; featurization reserves them (reserved_tokens)."""
        return self.prompt.length

    def set_step(self, step: int) -> None:
        """Optimizer steps done so far: drives the alignment weight schedule."""
        self.step = step

    def alignment_weight(self) -> float:
        a = self.cfg.alignment
        return align.alignment_weight(self.step, weight=a.weight, warmup_steps=a.warmup_steps, decay=a.decay,
                                      total_steps=self.cfg.train.max_steps)

    def train(self, mode: bool = True):
        super().train(mode)
        # A fully frozen backbone keeps its dropout off: its states are then the same function of the input
        # at every step (the teacher and the preservation target are computed with it too).
        if not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        elif mode:
            # the same rule for the frozen layers below the first trainable or prompted one: no dropout,
            # so cached and uncached runs compute the same states (dsxfer.method.cache)
            from dsxfer.method.cache import eval_below

            eval_below(self.backbone, self.first_open_layer)
        return self

    # --- forward passes

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                *, prompted: bool, hidden_states: bool = False):
        """Backbone forward with or without prompts; returns (outputs, number of virtual positions)."""
        if self.activation_cache is not None:  # no soft prompt exists then: layers below the cache's start are fixed
            prefixes = self.injection() if (prompted and self.injection is not None) else None
            with active_prefixes(prefixes):
                return self.activation_cache.encode(self, input_ids, attention_mask, token_type_ids, hidden_states=hidden_states), 0
        embeds = self.backbone.get_input_embeddings()(input_ids)
        n = self.prompt.length if prompted else 0
        if n:
            batch = input_ids.shape[0]
            embeds = torch.cat([self.prompt(batch).to(embeds.dtype), embeds], dim=1)
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
            if token_type_ids is not None:
                token_type_ids = torch.cat([token_type_ids.new_zeros(batch, n), token_type_ids], dim=1)
        kwargs = {"inputs_embeds": embeds, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if hidden_states:
            kwargs["output_hidden_states"] = True
        prefixes = self.injection() if (prompted and self.injection is not None) else None
        with active_prefixes(prefixes):
            return self.backbone(**kwargs), n

    def _task_outputs(self, batch: dict, *, prompted: bool) -> dict[str, torch.Tensor]:
        out, n = self._encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), prompted=prompted)
        states = out.last_hidden_state[:, n:]  # real token positions only
        if self.cfg.model.task == "qa":
            start, end = self.head(states)
            # padded positions are never an answer: masked, the loss does not depend on how a batch is padded
            pad = ~batch["attention_mask"].bool()
            return {"start_logits": start.masked_fill(pad, _MASKED), "end_logits": end.masked_fill(pad, _MASKED)}
        pooled = pool_for_classification(states, batch["attention_mask"], self.decoder)
        return {"logits": self.head(pooled)}

    def _task_loss(self, batch: dict, outputs: dict) -> torch.Tensor | None:
        if self.cfg.model.task == "qa":
            if "start_positions" not in batch:
                return None
            return qa_loss(outputs["start_logits"], outputs["end_logits"], batch["start_positions"], batch["end_positions"])
        if "labels" not in batch:
            return None
        return F.cross_entropy(outputs["logits"], batch["labels"])

    def _preservation(self, batch: dict, outputs: dict) -> torch.Tensor:
        """KL(unprompted || prompted) of the head's output distributions on source data."""
        with torch.no_grad():
            reference = self._task_outputs(batch, prompted=False)
        if self.cfg.model.task == "qa":
            pad = ~batch["attention_mask"].bool()
            terms = []
            for key in ("start_logits", "end_logits"):
                log_q = torch.log_softmax(outputs[key].masked_fill(pad, _MASKED), -1)
                log_p = torch.log_softmax(reference[key].masked_fill(pad, _MASKED), -1)
                terms.append(F.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))
            return sum(terms) / 2
        return F.kl_div(torch.log_softmax(outputs["logits"], -1), torch.log_softmax(reference["logits"], -1),
                        log_target=True, reduction="batchmean")

    def _layer_states(self, out) -> list[torch.Tensor]:
        return [out.hidden_states[i] for i in self.cfg.alignment.layers]

    def teacher_vectors(self, batch: dict) -> torch.Tensor:
        """(N, L, H) pooled source vectors of the frozen, unprompted backbone, from the cache when possible."""
        ids = batch["align_pair_ids"].tolist()
        cache = self.teacher_cache
        todo = cache.missing(ids)
        if self._peers_need_teacher(bool(todo)) and not todo:
            todo = [0]  # run the forward anyway (ZeRO-3 ranks must call the same modules); result is dropped
            ids_to_store = None
        else:
            ids_to_store = ids
        if todo:
            rows = torch.tensor(todo, device=batch["align_src_input_ids"].device)
            src_ids = batch["align_src_input_ids"][rows]
            src_mask = batch["align_src_attention_mask"][rows]
            was_training = self.backbone.training
            self.backbone.eval()  # the teacher is deterministic: no dropout
            # inference mode (no autograd bookkeeping at all) unless ZeRO-3 partitions the parameters: its
            # gathers write parameter storage, which inference mode forbids
            partitioned = any(hasattr(p, "ds_id") for p in self.backbone.parameters())
            with torch.no_grad() if partitioned else torch.inference_mode():
                out, _ = self._encode(src_ids, src_mask, None, prompted=False, hidden_states=True)
            if was_training:
                self.train()  # back to the training rule: frozen layers below the first open one stay in eval mode
            from dsxfer.kernels import masked_mean_pool

            pooled = torch.stack([masked_mean_pool(h.float(), src_mask) for h in self._layer_states(out)], dim=1)
            if ids_to_store is not None:
                cache.store([ids[r] for r in todo], pooled)
        return cache.get(ids, device=batch["align_tgt_input_ids"].device)

    def _peers_need_teacher(self, mine: bool) -> bool:
        """Under ZeRO-3 a forward gathers parameters collectively, so if any rank must run the teacher, all do."""
        import torch.distributed as dist

        partitioned = any(hasattr(p, "ds_id") for p in self.backbone.parameters())
        if not (partitioned and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return mine
        flag = torch.tensor([1.0 if mine else 0.0], device=next(self.head.parameters()).device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _alignment(self, batch: dict, *, with_loss: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(alignment loss, mean cosine of the pooled student and teacher vectors) on a pair batch.

        The cosine is what the training log and TensorBoard report per language: it is read off the
        student states of this very forward, so no later call can stand in for them. with_loss=False
        (alignment loss off: only the probes are measured) returns (None, cosine) and builds no graph.
        """
        from dsxfer.kernels import masked_mean_pool

        teacher = self.teacher_vectors(batch)
        with torch.set_grad_enabled(with_loss and torch.is_grad_enabled()):
            out, n = self._encode(batch["align_tgt_input_ids"], batch["align_tgt_attention_mask"], None,
                                  prompted=True, hidden_states=True)
        mask = batch["align_tgt_attention_mask"]
        a = self.cfg.alignment
        states = [h[:, n:] for h in self._layer_states(out)]  # real target tokens only
        loss = None
        if with_loss:
            loss = torch.stack([align.alignment_loss(h, mask, teacher[:, j], loss=a.loss, level=a.level, temperature=a.temperature)
                                for j, h in enumerate(states)]).mean()
        with torch.no_grad():
            cosine = torch.stack([F.cosine_similarity(masked_mean_pool(h.detach().float(), mask), teacher[:, j].float(), dim=-1).mean()
                                  for j, h in enumerate(states)]).mean()
        return loss, cosine

    @torch.no_grad()
    def alignment_cosine(self, batch: dict) -> float:
        """Mean cosine between the prompted student's pooled target vectors and the frozen teacher's source
        ones on a pair batch (eval mode). Every rank calls it under ZeRO-3, as any forward."""
        was_training = self.training
        self.eval()
        try:
            return float(self(batch)["align_cosine"])
        finally:
            self.train(was_training)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        device = batch_device(batch)
        zero = torch.zeros((), device=device)
        result: dict[str, torch.Tensor] = {}
        task_loss = align_loss = preserve_loss = zero
        if "input_ids" in batch:
            outputs = self._task_outputs(batch, prompted=True)
            result.update(outputs)
            loss = self._task_loss(batch, outputs)
            if loss is not None:
                task_loss = loss
            if self.cfg.alignment.preservation_weight > 0 and self.training:
                preserve_loss = self._preservation(batch, outputs)
        weight = self.alignment_weight() if self.cfg.alignment.enabled else 0.0
        if "align_tgt_input_ids" in batch and self.cfg.alignment.enabled:
            align_loss, result["align_cosine"] = self._alignment(batch)
        elif "align_tgt_input_ids" in batch:  # alignment loss off: a probe batch is measured, never trained on
            result["align_cosine"] = self._alignment(batch, with_loss=False)[1]
        total = task_loss + weight * align_loss + self.cfg.alignment.preservation_weight * preserve_loss
        result.update(loss=total, task_loss=task_loss,
                      align_loss=align_loss, preserve_loss=preserve_loss,
                      align_weight=torch.tensor(weight, device=device))
        return result

    # --- trainable state

    def merge_lora(self) -> int:
        """Fold every LoRA adapter into the frozen weight it adapts (W + alpha/r * B A), for inference only.

        An adapted projection then runs one matrix product instead of three (the LoRA branch is 18% of
        an evaluation's time at r 8 on query/value). The trainable parameters stay as they are, so the
        model's trainable state and `save_trainable` are unchanged, but training after a merge would
        count the adapter twice: `dsxfer eval` merges a model it loaded for evaluation only. Returns
        how many projections were merged (0 without LoRA, or when they already are).
        """
        if not self.cfg.adapters.lora:
            return 0
        from peft.tuners.lora import LoraLayer

        merged = 0
        for module in self.backbone.modules():
            if isinstance(module, LoraLayer) and not module.merged:
                module.merge(safe_merge=True)  # safe: refuses to write a non-finite weight
                merged += 1
        return merged

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "state dict") -> None:
        """Values of the trainable tensors back into the model (dsxfer.method.trainable.load; DataError on a mismatch)."""
        trainable.load(self, state, source=source)

    def save_trainable(self, run_dir: str | Path) -> Path:
        """<run_dir>/trainable.safetensors and, with a trained prompt, soft_prompt.safetensors (dsxfer.method.trainable.save)."""
        return trainable.save(self, run_dir, run_name=self.cfg.name)

    def summary(self) -> str:
        return trainable_summary(self)


def batch_device(batch: dict) -> torch.device:
    for v in batch.values():
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------ construction


def build_transfer_model(cfg: ExperimentConfig, *, tokenizer: Any = None) -> TransferModel:
    """Load the backbone named in the config (embedded default when none) and apply the whole method."""
    from dsxfer.method import backbone as bb

    kwargs: dict[str, Any] = {"task": cfg.model.task}
    accepted = inspect.signature(bb.load_backbone).parameters
    for key, value in (("trust_remote_code", cfg.model.trust_remote_code), ("dtype", cfg.model.dtype)):
        if key in accepted:
            kwargs[key] = value
    backbone = bb.load_backbone(cfg.model.name_or_path, **kwargs)
    if tokenizer is None:
        tokenizer = bb.load_tokenizer(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    torch.manual_seed(cfg.train.seed)  # prompts, prefixes and head start the same for the same seed
    return TransferModel(backbone, cfg, tokenizer, model_id=str(cfg.model.name_or_path or "embedded-default"))


def load_trained(run_dir: str | Path) -> TransferModel:
    """Rebuild a trained model from <run_dir>/config.yaml and <run_dir>/trainable.safetensors, in eval mode."""
    from dsxfer.config import load_config

    run = Path(run_dir)
    weights = run / TRAINABLE_FILE
    if not (run / CONFIG_FILE).is_file() or not weights.is_file():
        raise DataError(f"run folder {run} lacks {CONFIG_FILE} or {TRAINABLE_FILE}: give the output_dir of a finished training run")
    cfg = load_config(run / CONFIG_FILE)
    model = build_transfer_model(cfg)
    trainable.load(model, trainable.read(weights), source=str(weights))
    return model.eval()
