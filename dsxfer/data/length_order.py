"""Length-grouped training order: batches of similar length, so dynamic padding pads little.

`LengthGroupedOrder` keeps DataOrder's contract (dsxfer.data.sampling): an endless, seeded stream of
item indices whose whole state is one position, so a resumed run continues exactly where the saved one
was, and each rank takes its own slice of every global batch. Epoch e is built from the same seeded
permutation DataOrder draws (seed + 1_000_003 * e), then:

  1. cut into chunks of `chunk_batches` global batches (the randomness between chunks stays);
  2. each chunk sorted by length, longest first, and cut into global batches;
  3. those batches shuffled within the chunk (seeded), so lengths do not fall monotonically.

A global batch therefore holds rows of nearly equal length; each rank's slice of it does too. The last
chunk of an epoch may be shorter; batches never mix epochs' chunks in a way that depends on how the
stream is read, because the order of an epoch is a function of (lengths, seed, epoch, batch) only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsxfer.data.sampling import DataOrder


class LengthGroupedOrder(DataOrder):
    def __init__(self, lengths: Sequence[int], seed: int, pos: int = 0, *, global_batch: int, chunk_batches: int = 32):
        if global_batch <= 0 or chunk_batches <= 0:
            raise ValueError("global_batch and chunk_batches must be positive")
        super().__init__(len(lengths), seed, pos)
        self.lengths = list(lengths)
        self.global_batch, self.chunk_batches = global_batch, chunk_batches

    def epoch_order(self, epoch: int) -> list[int]:
        perm = super().epoch_order(epoch)  # DataOrder's permutation of this epoch
        chunk = self.global_batch * self.chunk_batches
        shuffle = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch + 1)
        order: list[int] = []
        for lo in range(0, self.n, chunk):
            part = sorted(perm[lo: lo + chunk], key=lambda i: -self.lengths[i])  # stable: ties keep the random order
            batches = [part[b: b + self.global_batch] for b in range(0, len(part), self.global_batch)]
            for b in torch.randperm(len(batches), generator=shuffle).tolist():
                order += batches[b]
        return order
