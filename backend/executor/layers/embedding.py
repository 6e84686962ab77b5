"""Vocabulary-parallel input embedding and output head.

With ``tp_size`` ranks each holds a contiguous slice of the (padded) vocabulary::

    rank 0: ids [0, n)   rank 1: ids [n, 2n)   ...   n = ceil(vocab / tp_size)

The embedding looks up the ids it owns and zeroes the others, then all-reduces; the head computes its
slice of the logits and all-gathers them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from inflight.backend.executor.parallel import SINGLE_RANK, ParallelConfig


class VocabParallelEmbedding(nn.Module):
    """Token embedding table split over ranks by vocabulary range."""

    def __init__(
        self, vocab_size: int, hidden_size: int, dtype: torch.dtype, parallel: ParallelConfig = SINGLE_RANK
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.parallel = parallel
        self.rows_per_rank = -(-vocab_size // parallel.tp_size)
        self.vocab_start = parallel.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = nn.Parameter(
            torch.empty(self.rows_per_rank, hidden_size, dtype=dtype), requires_grad=False
        )

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """Copy this rank's vocabulary rows of the full ``[vocab, hidden]`` table."""
        if loaded.shape[0] != self.vocab_size or loaded.shape[1] != param.shape[1]:
            raise ValueError(
                f"embedding: checkpoint shape {tuple(loaded.shape)} != "
                f"expected ({self.vocab_size}, {param.shape[1]})"
            )
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded[self.vocab_start : self.vocab_end])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] int64
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        owned = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(owned, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)
        return self.parallel.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits (possibly sharing the embedding's weight)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[num_tokens, hidden] -> [num_tokens, vocab]`` logits in the weight's dtype.

        NOTE: not widened to fp32 here: the product is rounded to the dtype anyway, so widening adds no
        precision, and a greedy batch takes the argmax as it is (at 512 rows x 128k vocabulary the fp32
        copies were ~0.9 GB of memory traffic a step); the sampler widens what it computes on.
        """
        logits = F.linear(hidden, self.weight)
        logits = self.parallel.all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
