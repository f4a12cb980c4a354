"""Task heads on top of the backbone's last hidden states (real token positions only).

Extractive QA: one linear map to (start, end) logits per token, for encoders and decoders alike.
Sentence-pair classification: a pooled vector -> linear -> class logits. Encoders pool the first real
token (<s>/[CLS]); decoders pool the last real token, the only one that has seen the whole pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QAHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.span = nn.Linear(hidden, 2)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H) -> start_logits (B, T), end_logits (B, T) in float32."""
        logits = self.span(hidden_states.to(self.span.weight.dtype)).float()
        start, end = logits.unbind(-1)
        return start, end


def qa_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
            end_positions: torch.Tensor) -> torch.Tensor:
    """Mean of the start and end cross-entropies; positions outside the window are ignored."""
    T = start_logits.shape[1]
    start = start_positions.clamp(0, T)  # T = ignore_index: an answer the featurizer could not place
    end = end_positions.clamp(0, T)
    return (F.cross_entropy(start_logits, start, ignore_index=T) + F.cross_entropy(end_logits, end, ignore_index=T)) / 2


def pool_for_classification(hidden_states: torch.Tensor, attention_mask: torch.Tensor, decoder: bool) -> torch.Tensor:
    """(B, T, H) -> (B, H): the first token for encoders, the last real token for decoders (right padding)."""
    if not decoder:
        return hidden_states[:, 0]
    last = attention_mask.long().sum(1).clamp_min(1) - 1
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


class ClassificationHead(nn.Module):
    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(pooled.to(self.out.weight.dtype))).float()
