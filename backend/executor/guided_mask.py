"""A step's grammar masks on the device: the guided rows' bitmasks, applied to the logits before sampling.

The engine fills the masks on the host (``engine/guided.py``, llguidance) while the step's forward runs; the
executor copies them once, after the forward is queued, and the sampler sets every disallowed token's logit
to -inf on those rows only::

    bitmask [num_guided, ceil(V / 32)] int32      bit b of word w = token 32 * w + b allowed
      └─ viewed as bytes, unpacked ─► allowed [num_guided, V] bool ─► logits[rows] = where(allowed, logits, -inf)

Tokens at or past 32 * words (none when the mask covers the vocabulary) stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_BITS = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)


@dataclass
class GuidedLogitsMask:
    """The guided rows of a step and their masks, on the logits' device."""

    rows: torch.Tensor  # [num_guided] int64: rows of the step's sampling batch
    bitmask: torch.Tensor  # [num_guided, words] int32

    @classmethod
    def from_host(cls, rows: list[int], bitmask: np.ndarray, device: torch.device) -> GuidedLogitsMask:
        """Copy the host masks to ``device`` (pinned, asynchronous on CUDA: queued behind the forward)."""
        host_rows = torch.tensor(rows, dtype=torch.int64)
        host_mask = torch.from_numpy(np.ascontiguousarray(bitmask, dtype=np.int32))
        if device.type == "cuda":
            host_rows, host_mask = host_rows.pin_memory(), host_mask.pin_memory()
        return cls(host_rows.to(device, non_blocking=True), host_mask.to(device, non_blocking=True))

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """[num_guided, vocab_size] bool: the tokens each guided row may sample."""
        as_bytes = self.bitmask.view(torch.uint8)  # little-endian: byte k holds tokens 8k .. 8k + 7
        bits = _BITS.to(as_bytes.device)
        unpacked = (as_bytes.unsqueeze(-1) & bits) != 0  # [num_guided, words * 4, 8]
        allowed = unpacked.view(len(self.bitmask), -1)
        if allowed.shape[1] < vocab_size:
            pad = torch.ones(
                len(allowed), vocab_size - allowed.shape[1], dtype=torch.bool, device=allowed.device
            )
            allowed = torch.cat([allowed, pad], dim=1)
        return allowed[:, :vocab_size]

    def apply_(self, logits: torch.Tensor) -> None:
        """Set the disallowed tokens' logits of the guided rows to -inf (``logits``: [num_seqs, V] float32,
        in place)."""
        guided = logits.index_select(0, self.rows)
        guided.masked_fill_(~self.allowed(logits.shape[1]), float("-inf"))
        logits.index_copy_(0, self.rows, guided)
