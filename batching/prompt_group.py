"""The n sequences of one prompt (parallel sampling): one prefill of the prompt's full blocks, shared.

```
prompt (P = 37 tokens, block_size 16):  [ 0 .. 15 ][ 16 .. 31 ][ 32 .. 36 ]
shared blocks (those below the last token):  b1          b2         -
sequence 0 (the member that computes them):  b1          b2         b3   (its own partial block)
sequence 1 (joins once b1, b2 are planned):  b1          b2         b4   (recomputes tokens 32 .. 36)
sequence 2:                                   b1          b2         b5
ref_cnt:                                      3           3          1 each
```
Each sequence is an ordinary ``Request`` with its own block table; the full blocks of the prompt below its
last token (``num_shared_tokens``, the most a prefix-cache hit could cover) are taken by reference count,
like a prefix-cache hit, and the partial last block is recomputed by each sequence (at most
``block_size`` tokens: the last token must be computed anyway to produce logits). The group holds no
reference of its own: its ``blocks`` are valid while some member (a holder) has them in its table; when
the last holder frees them (finished, preempted, swapped out) the group forgets them and the next member
admitted computes them again (or takes them from the prefix cache). So preemption, swapping, chunked
prefill and cancellation need nothing new, and prefix caching on or off shares the same way.
"""

from __future__ import annotations

from .block_pool import KVCacheBlock


class PromptGroup:
    """What the scheduler and the KV-cache manager know of the sequences of one prompt.

    Attributes:
        group_id: the caller's request id.
        num_shared_blocks: the prompt's full blocks below its last token.
        blocks: those blocks, once a member has them planned (their KV written by a step in flight or
            done); None before, and again once no member holds them.
        holder_ids: the members whose block tables start with ``blocks``.
        leader_id: the member computing the shared blocks now (admitted while ``blocks`` was None, still
            running): the others wait for it instead of computing the prompt themselves.
    """

    def __init__(self, group_id: str, num_prompt_tokens: int, block_size: int) -> None:
        self.group_id = group_id
        self.block_size = block_size
        self.num_shared_blocks = (num_prompt_tokens - 1) // block_size
        self.blocks: list[KVCacheBlock] | None = None
        self.holder_ids: set[str] = set()
        self.leader_id: str | None = None

    @classmethod
    def for_prompt(cls, group_id: str, num_prompt_tokens: int, block_size: int) -> PromptGroup | None:
        """A group for a prompt of ``num_prompt_tokens``; None when it has no full block to share (then
        each sequence computes its short prompt itself)."""
        if (num_prompt_tokens - 1) // block_size == 0:
            return None
        return cls(group_id, num_prompt_tokens, block_size)

    @property
    def num_shared_tokens(self) -> int:
        """Tokens in the shared blocks."""
        return self.num_shared_blocks * self.block_size

    def __repr__(self) -> str:
        blocks = None if self.blocks is None else [b.block_id for b in self.blocks]
        return f"PromptGroup({self.group_id!r}, blocks={blocks}, holders={sorted(self.holder_ids)})"
