"""Chained block hashes and the Request's incremental bookkeeping."""

import hashlib
import struct
import subprocess
import sys

import pytest

from inflight.batching import Request, RequestStatus
from inflight.batching.block_pool import compute_block_hashes, hash_block_tokens


def _reference_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """The documented digest, computed directly: SHA-256 of a marker byte (0: first block; 1: the parent
    digest follows), the parent digest, and the token ids as native-order signed 64-bit integers."""
    head = b"\x00" if parent is None else b"\x01" + parent
    return hashlib.sha256(head + struct.pack(f"={len(token_ids)}q", *token_ids)).digest()


def _reference_chain(token_ids: list[int], block_size: int) -> list[bytes]:
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) // block_size * block_size, block_size):
        hashes.append(_reference_hash(hashes[-1] if hashes else None, token_ids[start : start + block_size]))
    return hashes


def test_hash_is_the_documented_sha256_digest() -> None:
    assert hash_block_tokens(None, [1, 2, 3, 4]) == _reference_hash(None, [1, 2, 3, 4])
    parent = _reference_hash(None, [9, 9])
    assert hash_block_tokens(parent, [5, -1, 2**63 - 1]) == _reference_hash(parent, [5, -1, 2**63 - 1])
    assert compute_block_hashes(list(range(11)), 4) == _reference_chain(list(range(11)), 4)


def test_hash_is_a_sha256_digest_and_depends_on_parent_and_order() -> None:
    h = hash_block_tokens(None, [1, 2, 3, 4])
    assert isinstance(h, bytes) and len(h) == hashlib.sha256().digest_size
    assert h == hash_block_tokens(None, (1, 2, 3, 4))  # list or tuple: same key
    assert h != hash_block_tokens(None, [4, 3, 2, 1])
    assert h != hash_block_tokens(h, [1, 2, 3, 4])
    assert hash_block_tokens(h, [5]) != hash_block_tokens(hash_block_tokens(None, [9]), [5])


def test_no_parent_is_not_confused_with_a_parent_of_token_bytes() -> None:
    # 32 bytes of a parent digest are as long as 4 packed int64 tokens; the marker keeps them apart.
    parent = hash_block_tokens(None, [7, 7, 7, 7])
    tokens = list(range(8))
    assert hash_block_tokens(None, tokens) != hash_block_tokens(parent, tokens[4:])


def test_compute_block_hashes_chains_and_skips_partial_block() -> None:
    tokens = list(range(10, 21))  # 11 tokens, block size 4 -> 2 full blocks
    h0 = _reference_hash(None, [10, 11, 12, 13])
    h1 = _reference_hash(h0, [14, 15, 16, 17])
    assert compute_block_hashes(tokens, 4) == [h0, h1]
    assert compute_block_hashes(tokens[:3], 4) == []
    assert compute_block_hashes(tokens[4:8], 4, parent=h0) == [h1]
    with pytest.raises(ValueError, match="block_size must be positive, got 0"):
        compute_block_hashes(tokens, 0)


def test_same_block_tokens_after_different_prefixes_hash_differently() -> None:
    a = compute_block_hashes([1, 2, 3, 4, 9, 9, 9, 9], 4)
    b = compute_block_hashes([5, 6, 7, 8, 9, 9, 9, 9], 4)
    assert a[1] != b[1]


def test_request_bookkeeping_and_incremental_block_hashes() -> None:
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    req = Request("r", prompt, block_size=4, arrival_index=7)
    prompt.append(999)  # the request keeps its own copy
    assert req.prompt_token_ids == [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    assert (req.num_tokens, req.num_prompt_tokens, req.num_output_tokens) == (10, 10, 0)
    assert req.status == RequestStatus.WAITING and req.num_computed_tokens == 0
    assert req.num_cached_tokens is None and req.num_preemptions == 0 and req.arrival_index == 7
    h0 = _reference_hash(None, [3, 1, 4, 1])
    h1 = _reference_hash(h0, [5, 9, 2, 6])
    assert req.block_hashes == [h0, h1]

    req.append_output_token(8)  # 11 tokens: block 2 not full yet
    assert req.block_hashes == [h0, h1]
    req.append_output_token(7)  # 12 tokens: block 2 = [5, 3, 8, 7] is full
    assert req.block_hashes == [h0, h1, _reference_hash(h1, [5, 3, 8, 7])]
    assert req.output_token_ids == [8, 7]
    assert req.all_token_ids == [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 8, 7]
    assert (req.num_tokens, req.num_output_tokens) == (12, 2)
    # O(1) access: the same list every time, not a fresh concatenation.
    assert req.all_token_ids is req.all_token_ids


def test_block_size_one_hashes_every_token() -> None:
    req = Request("r", [5, 6], block_size=1)
    req.append_output_token(7)
    assert req.block_hashes == _reference_chain([5, 6, 7], 1)
    assert len(req.block_hashes) == 3


def test_request_rejects_empty_prompt_and_bad_block_size() -> None:
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Request("r", [], block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        Request("r", [1], block_size=0)


def test_status_is_finished() -> None:
    finished = {s for s in RequestStatus if s.is_finished}
    assert finished == {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.FINISHED_ERROR,
    }
    req = Request("r", [1], block_size=4)
    assert not req.is_finished
    req.status = RequestStatus.FINISHED_ABORTED
    assert req.is_finished


def test_batching_is_pure_python() -> None:
    code = (
        "import sys, inflight.batching, inflight.batching.scheduler; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_request_defaults_and_its_block_size_error_names_the_request() -> None:
    req = Request("r", [1, 2], block_size=4)
    assert req.arrival_index == 0 and req.max_output_tokens is None and req.num_pending_tokens == 0
    for block_size in (0, -2):
        with pytest.raises(ValueError, match=f"^request 'r': block_size must be positive, got {block_size}$"):
            Request("r", [1], block_size=block_size)
