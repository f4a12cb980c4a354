"""Knowledge alignment: pull the prompted model's target-language states onto the frozen source ones.

For a parallel pair (source s, target t): teacher = the frozen backbone WITHOUT prompts on s, student =
the prompted model on t. Representations are hidden states of chosen layers (index into the
hidden-states tuple: 0 = embeddings, -1 = last layer); with several layers the losses are averaged.

The teacher is always the masked mean-pooled source vector of each layer (N, H): it is constant, so it is
computed once per pair id and cached (TeacherCache), never recomputed in a later epoch.

Levels:
  pooled  the student vector is the masked mean of the target states; one row per pair.
  token   every real target token's state is compared with the teacher's pooled source vector of its
          pair (no word alignment needed); the per-token losses are averaged over all real tokens
          of the batch. It pushes each token toward the sentence meaning, a stronger pull than pooled.

Loss forms, with s_n the student row, t_n the teacher vector, hats = L2-normalised, tau = temperature:
  cosine   mean (1 - cos(s_n, t_n))
  mse      mean over rows and features of (s_nh - t_nh)^2 (raw vectors)
  infonce  mean -log softmax_m(<s^_n, t^_m> / tau)[n]; the other pairs of the batch are negatives
  kl       the model has no output vocabulary distribution (a base encoder has no MLM head), so kl
           compares in-batch similarity distributions: teacher p_n = softmax_m(<t^_n, t^_m> / tau)
           (how the source sentences relate to each other), student q_n = softmax_m(<s^_n, t^_m> / tau);
           loss = mean KL(p_n || q_n). It preserves the relational structure rather than exact vectors.
Pooled cosine/mse/infonce go through dsxfer.kernels.alignment_loss (fused on GPU); the rest is PyTorch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from dsxfer.errors import ConfigError, DataError
from dsxfer.method.schedule import DECAYS, warmup_then_decay

LOSSES = ("cosine", "mse", "infonce", "kl")
LEVELS = ("pooled", "token")


def check_loss(loss: str, level: str = "pooled") -> None:
    if loss not in LOSSES:
        raise ConfigError(f"config value alignment.loss={loss!r} is invalid: unknown loss, expected one of {', '.join(LOSSES)}")
    if level not in LEVELS:
        raise ConfigError(f"config value alignment.level={level!r} is invalid: expected one of {', '.join(LEVELS)}")


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, row_of: torch.Tensor, temperature: float) -> torch.Tensor:
    """student rows (R, H) each belonging to pair row_of[r]; teacher (N, H). Returns per-row KL (R,)."""
    s = F.normalize(student, dim=-1)
    t = F.normalize(teacher, dim=-1)
    log_q = torch.log_softmax(s @ t.T / temperature, dim=-1)
    log_p = torch.log_softmax(t @ t.T / temperature, dim=-1)[row_of]
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def pooled_alignment_loss(hidden: torch.Tensor, mask: torch.Tensor, teacher: torch.Tensor, loss: str,
                          temperature: float) -> torch.Tensor:
    from dsxfer import kernels

    if loss in ("cosine", "mse", "infonce"):
        return kernels.alignment_loss(hidden, mask, teacher, loss, temperature)
    cdtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    s = kernels.masked_mean_pool(hidden.to(cdtype), mask)
    rows = torch.arange(len(s), device=s.device)
    return _kl_rows(s, teacher.to(cdtype), rows, temperature).mean()


def token_alignment_loss(hidden: torch.Tensor, mask: torch.Tensor, teacher: torch.Tensor, loss: str,
                         temperature: float) -> torch.Tensor:
    cdtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    real = mask.bool()
    s = hidden.to(cdtype)[real]                                     # (R, H): every real target token
    row_of = torch.arange(hidden.shape[0], device=hidden.device)[:, None].expand_as(real)[real]
    t = teacher.to(cdtype)
    if loss == "cosine":
        return (1.0 - F.cosine_similarity(s, t[row_of], dim=-1)).mean()
    if loss == "mse":
        return (s - t[row_of]).pow(2).mean()
    if loss == "infonce":
        logits = F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).T / temperature
        return F.cross_entropy(logits, row_of)
    if loss == "kl":
        return _kl_rows(s, t, row_of, temperature).mean()
    check_loss(loss)
    raise AssertionError("unreachable")


def alignment_loss(hidden: torch.Tensor, mask: torch.Tensor, teacher: torch.Tensor, *, loss: str = "cosine",
                   level: str = "pooled", temperature: float = 0.05) -> torch.Tensor:
    """hidden (N, T, H) student states on target sentences, mask (N, T), teacher (N, H) pooled source vectors."""
    check_loss(loss, level)
    fn = pooled_alignment_loss if level == "pooled" else token_alignment_loss
    return fn(hidden, mask, teacher, loss, temperature)


def alignment_weight(step: int, *, weight: float, warmup_steps: int = 0, decay: str = "none",
                     total_steps: int | None = None) -> float:
    """lambda(step): linear warm-up from 0 to `weight`, then constant, or linear/cosine decay to 0 at total_steps.

    `dsxfer.method.schedule.warmup_then_decay` with offset 0: `step` optimizer steps are done, so the first
    step's lambda is exactly 0 (the module docstring there says why the learning rate counts from 1).
    """
    if decay not in DECAYS:
        raise ConfigError(f"config value alignment.decay={decay!r} is invalid: expected none, linear or cosine")
    return warmup_then_decay(step, peak=weight, warmup_steps=warmup_steps, total_steps=total_steps, decay=decay, offset=0)


class TeacherCache:
    """Teacher vectors (L, H) per pair id, in memory and optionally on disk.

    The disk files are keyed by the model and the layers, so a later run with the same backbone and the
    same parallel data re-uses them; training calls `flush()` at every checkpoint and at the end, and it
    writes what is new. Each rank computes the teacher for its own pair batches, so rank r writes
    `teacher-<key>.rank<r>.safetensors` and every rank reads all of them.
    """

    def __init__(self, model_id: str, layers: list[int], cache_dir: str | Path | None = None):
        self.layers = list(layers)
        self.vectors: dict[int, torch.Tensor] = {}
        self.teacher_forwards = 0  # how many teacher rows were computed (not served from the cache)
        self._dirty = False
        # the trailing "|" once separated a pair-id namespace; it stays so that existing cache files keep their names
        self.key = hashlib.sha1(f"{model_id}|{self.layers}|".encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) if cache_dir else None
        if self.dir is not None:
            for path in sorted(self.dir.glob(f"teacher-{self.key}.rank*.safetensors")):
                self._load(path)

    @property
    def path(self) -> Path | None:
        """This rank's cache file."""
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return self.dir / f"teacher-{self.key}.rank{rank}.safetensors" if self.dir is not None else None

    def _load(self, path: Path) -> None:
        from safetensors.torch import load_file

        try:
            data = load_file(str(path))
            data["ids"], data["vectors"]
        except Exception as e:
            raise DataError(f"teacher cache {path} cannot be read ({e}): delete it and it will be rebuilt") from None
        self.load_state(data)

    def flush(self) -> None:
        if self.dir is None or not self._dirty or not self.vectors:
            return
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file(self.state(), str(tmp))
        tmp.replace(self.path)  # atomic: a crash never leaves a half-written cache
        self._dirty = False

    def state(self) -> dict[str, torch.Tensor]:
        """All vectors as tensors (ids, vectors): what a checkpoint keeps for an exact resume."""
        ids = sorted(self.vectors)
        return {"ids": torch.tensor(ids, dtype=torch.long),
                "vectors": torch.stack([self.vectors[i] for i in ids]).contiguous()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, v in zip(state["ids"].tolist(), state["vectors"]):
            self.vectors[int(i)] = v

    def missing(self, pair_ids: list[int]) -> list[int]:
        """Row positions whose pair id is not cached yet."""
        return [r for r, i in enumerate(pair_ids) if i not in self.vectors]

    def store(self, pair_ids: list[int], vectors: torch.Tensor) -> None:
        for i, v in zip(pair_ids, vectors.detach().float().cpu()):
            self.vectors[int(i)] = v
        self.teacher_forwards += len(pair_ids)
        self._dirty = True

    def get(self, pair_ids: list[int], device, dtype=torch.float32) -> torch.Tensor:
        """(N, L, H) for the given ids (all must be cached)."""
        return torch.stack([self.vectors[int(i)] for i in pair_ids]).to(device=device, dtype=dtype)

    def __len__(self) -> int:
        return len(self.vectors)
