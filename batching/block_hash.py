"""Chained hashes over full KV-cache blocks, the keys of the prefix cache.

```
tokens:  [t0 t1 t2 t3][t4 t5 t6 t7][t8 t9]
hashes:   h0 = H(None, t0..t3)
                       h1 = H(h0, t4..t7)
                                    (no hash: the block is not full)
```
A block's hash depends on every token before it, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

# NOTE: a BlockHash is the 32-byte SHA-256 digest of (parent digest, token ids). Python's built-in
# `hash()` of a tuple is 64 bits and easy to collide on purpose; a collision would silently hand one
# request another request's KV, so the prefix cache uses a cryptographic digest. The digest is
# process-local (token ids are packed in native byte order); it is never persisted.
BlockHash = bytes

# Marks the first block of a sequence, so that (no parent, tokens) can never be mistaken for
# (parent, fewer tokens) whatever the block size.
_NO_PARENT = b"\x00"
_HAS_PARENT = b"\x01"


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Return the chained hash of one full block.

    Args:
        parent: the hash of the previous block of the sequence, or None for the first block.
        token_ids: the token ids of this block (each must fit in a signed 64-bit integer).
    """
    hasher = hashlib.sha256()
    if parent is None:
        hasher.update(_NO_PARENT)
    else:
        hasher.update(_HAS_PARENT)
        hasher.update(parent)
    hasher.update(array("q", token_ids).tobytes())
    return hasher.digest()


def compute_block_hashes(
    token_ids: Sequence[int], block_size: int, parent: BlockHash | None = None
) -> list[BlockHash]:
    """Return the chained hashes of the full blocks of `token_ids` (a trailing partial block is skipped).

    Args:
        token_ids: the sequence, starting at a block boundary.
        block_size: tokens per block.
        parent: the hash of the block before `token_ids[0]`, or None when it starts the sequence.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    block_hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        block_hashes.append(parent)
    return block_hashes
