"""k-shot sampling (seeded, reproducible, class-balanced for classification, per language) and the
training order of items (DataOrder).

The sampled ids are written with the run (shots.json) so that an evaluation can prove it never
scores a shot, and a rerun can reuse exactly the same shots.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsxfer.errors import DataError


def sample_k_shot(
    pool: Sequence[Any], k: int, seed: int, *, balanced: bool = False, lang: str = "", exclude: Sequence[str] = ()
) -> list[Any]:
    """k records from pool, the same ones for the same (pool, k, seed, lang).

    balanced=True (classification) draws k // n_classes from every label and the remainder from
    labels in a seeded order, so class shares differ by at most one. Records whose id is in exclude
    (e.g. the test rows) are never drawn.
    """
    if k < 0:
        raise DataError(f"k-shot: k must be >= 0, got {k}")
    banned = set(exclude)
    candidates = sorted((r for r in pool if r.id not in banned), key=lambda r: r.id)
    where = f" for language '{lang}'" if lang else ""
    if k > len(candidates):
        raise DataError(f"k-shot: k={k} is larger than the pool of {len(candidates)} examples{where}; lower data.k_shot or add data")
    # the language enters the seed so that languages get independent draws from parallel pools
    rng = random.Random(f"{seed}:{lang}")
    if not balanced:
        return rng.sample(candidates, k)
    by_label: dict[int, list[Any]] = defaultdict(list)
    for r in candidates:
        by_label[r.label].append(r)
    labels = sorted(by_label)
    per, extra = divmod(k, len(labels))
    extra_labels = set(rng.sample(labels, extra))
    chosen = []
    for label in labels:
        want = per + (label in extra_labels)
        if want > len(by_label[label]):
            raise DataError(f"k-shot: a class-balanced k={k} needs {want} examples of label {label}{where}, the pool has {len(by_label[label])}; lower data.k_shot")
        chosen += rng.sample(by_label[label], want)
    rng.shuffle(chosen)
    return chosen


def save_shots(path: str | Path, shots: Mapping[str, Sequence[Any]], *, task: str, k: int, seed: int) -> Path:
    """Write {task, k, seed, ids: {lang: [id, ...]}} as JSON (records or plain ids accepted)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ids = {lang: [r if isinstance(r, str) else r.id for r in recs] for lang, recs in shots.items()}
    p.write_text(json.dumps({"task": task, "k": k, "seed": seed, "ids": ids}, indent=1, ensure_ascii=False), encoding="utf-8")
    return p


def load_shots(path: str | Path) -> dict[str, Any]:
    """Read a file written by save_shots; checks its fields."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{p}: shots file not found; it is written by training as <run_dir>/shots.json") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: line {e.lineno}: not valid JSON ({e.msg}); the shots file is corrupt, rerun the sampling") from None
    for key, kind in (("task", str), ("k", int), ("seed", int), ("ids", dict)):
        if not isinstance(doc.get(key), kind):
            raise DataError(f"{p}: field '{key}' is missing or not {kind.__name__}; the shots file must come from save_shots")
    return doc


class DataOrder:
    """An endless, seeded stream of item indices: epoch e is a permutation drawn from seed + e.

    The whole state is one position, so a resumed run continues exactly where the saved one was.
    Each rank takes its own slice of every global batch. Subclasses change `epoch_order` only.
    """

    def __init__(self, n: int, seed: int, pos: int = 0):
        self.n, self.seed, self.pos = n, seed, pos
        self._epoch, self._order = -1, None

    def epoch_order(self, epoch: int) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _index(self, p: int) -> int:
        epoch = p // self.n
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.epoch_order(epoch)
        return self._order[p % self.n]

    def next(self, per_rank: int, rank: int, world: int) -> list[int]:
        start = self.pos + rank * per_rank
        out = [self._index(p) for p in range(start, start + per_rank)]
        self.pos += per_rank * world
        return out
