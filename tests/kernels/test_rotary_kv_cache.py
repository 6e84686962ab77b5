"""RoPE, RoPE fused with the paged-cache write, and the plain cache write, against their references."""

from __future__ import annotations

import pytest
import torch

from inflight.kernels.kv_cache import write_kv_cache, write_kv_cache_reference
from inflight.kernels.rotary import (
    rotary_embedding,
    rotary_embedding_reference,
    rotary_embedding_write_kv_cache,
    rotary_embedding_write_kv_cache_reference,
)

from .conftest import ELEMENTWISE_TOL, assert_close

# (num_heads, num_kv_heads, head_dim): SmolLM2's 9/3, 12/3, MHA 6/6, 8:1, and a head_dim of 96 whose
# half (48) is not a power of two.
HEADS = [(9, 3, 64), (12, 3, 128), (6, 6, 64), (8, 1, 64), (4, 2, 96)]
MAX_POSITION = 300


def cos_sin_cache(head_dim: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(MAX_POSITION).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


def fused_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device):
    """q, k, v as the strided views of one [T, (H + 2 KVH) * D] projection, as the model makes them."""
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype).to(device)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (
        q.view(num_tokens, num_heads, head_dim),
        k.view(num_tokens, num_kv_heads, head_dim),
        v.view(num_tokens, num_kv_heads, head_dim),
    )


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
def test_rotary_matches_reference(device, dtype, heads) -> None:
    num_heads, num_kv_heads, head_dim = heads
    q, k, _ = fused_qkv(7, num_heads, num_kv_heads, head_dim, dtype, device)
    positions = torch.tensor([0, 1, 299, 17, 17, 128, 5], device=device)
    cache = cos_sin_cache(head_dim, device)
    q_rot, k_rot = rotary_embedding(positions, q, k, cache)
    ref_q, ref_k = rotary_embedding_reference(positions, q, k, cache)
    assert_close(q_rot, ref_q, ELEMENTWISE_TOL[dtype])
    assert_close(k_rot, ref_k, ELEMENTWISE_TOL[dtype])


def test_rotary_int32_positions(device) -> None:
    q, k, _ = fused_qkv(3, 4, 2, 64, torch.float32, device)
    cache = cos_sin_cache(64, device)
    positions = torch.tensor([3, 250, 0], device=device)
    got = rotary_embedding(positions.int(), q, k, cache)
    ref = rotary_embedding_reference(positions, q, k, cache)
    assert_close(got[0], ref[0], ELEMENTWISE_TOL[torch.float32])
    assert_close(got[1], ref[1], ELEMENTWISE_TOL[torch.float32])


def _caches(num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
    """K and V caches as views into one buffer with a guard block before, between and after them (as a
    layer's cache sits between its neighbours'), so a stray write lands in a guard, not out of memory."""
    buffer = torch.randn(2 * num_blocks + 3, block_size, num_kv_heads, head_dim).to(dtype).to(device)
    return buffer[1 : num_blocks + 1], buffer[num_blocks + 2 : 2 * num_blocks + 2]


def _guards(cache: torch.Tensor) -> torch.Tensor:
    buffer = cache._base
    num_blocks = cache.shape[0]
    return torch.stack([buffer[0], buffer[num_blocks + 1], buffer[-1]]).clone()


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
def test_rotary_write_kv_cache_matches_reference(device, dtype, heads) -> None:
    num_heads, num_kv_heads, head_dim = heads
    q, k, v = fused_qkv(8, num_heads, num_kv_heads, head_dim, dtype, device)
    positions = torch.tensor([0, 1, 2, 0, 40, 41, 0, 7], device=device)
    # Block size 5, shuffled slots across blocks, two padded rows (-1) that must write nothing.
    slot_mapping = torch.tensor([17, 18, 19, -1, 3, 4, -1, 31], device=device)
    cache = cos_sin_cache(head_dim, device)
    k_cache, v_cache = _caches(8, 5, num_kv_heads, head_dim, dtype, device)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    guards = _guards(k_cache)
    q_rot = rotary_embedding_write_kv_cache(positions, q, k, v, cache, k_cache, v_cache, slot_mapping)
    assert torch.equal(_guards(k_cache), guards), "a padded row (slot -1) wrote outside its slot"
    ref_q = rotary_embedding_write_kv_cache_reference(
        positions, q, k, v, cache, ref_k_cache, ref_v_cache, slot_mapping
    )
    assert_close(q_rot, ref_q, ELEMENTWISE_TOL[dtype])
    assert_close(k_cache, ref_k_cache, ELEMENTWISE_TOL[dtype])
    assert torch.equal(v_cache, ref_v_cache)  # a plain copy: exact


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "x".join(map(str, h)))
def test_rotary_write_kv_cache_rotates_k_in_place(device, dtype, heads) -> None:
    """``rotate_k_in_place``: k (a view of the fused qkv rows) becomes exactly the keys the cache got."""
    num_heads, num_kv_heads, head_dim = heads
    q, k, v = fused_qkv(8, num_heads, num_kv_heads, head_dim, dtype, device)
    positions = torch.tensor([0, 1, 2, 0, 40, 41, 0, 7], device=device)
    slot_mapping = torch.tensor([17, 18, 19, -1, 3, 4, -1, 31], device=device)
    cache = cos_sin_cache(head_dim, device)
    k_cache, v_cache = _caches(8, 5, num_kv_heads, head_dim, dtype, device)
    ref_k, ref_k_cache, ref_v_cache = k.clone(), k_cache.clone(), v_cache.clone()
    q_before, v_before = q.clone(), v.clone()
    q_rot = rotary_embedding_write_kv_cache(
        positions, q, k, v, cache, k_cache, v_cache, slot_mapping, rotate_k_in_place=True
    )
    ref_q = rotary_embedding_write_kv_cache_reference(
        positions, q_before, ref_k, v_before, cache, ref_k_cache, ref_v_cache, slot_mapping, True
    )
    assert_close(q_rot, ref_q, ELEMENTWISE_TOL[dtype])
    assert_close(k, ref_k, ELEMENTWISE_TOL[dtype])
    assert torch.equal(q, q_before) and torch.equal(v, v_before), "only k is overwritten"
    written = slot_mapping >= 0
    slots = slot_mapping[written]
    cached = k_cache.reshape(-1, num_kv_heads, head_dim)[slots]
    assert torch.equal(cached, k[written]), "k and the cache must hold the same rotated keys"


@pytest.mark.parametrize("heads", [(9, 3, 64), (4, 4, 128), (2, 1, 96)], ids=lambda h: "x".join(map(str, h)))
def test_write_kv_cache_matches_reference_exactly(device, dtype, heads) -> None:
    _, num_kv_heads, head_dim = heads
    _, k, v = fused_qkv(6, 1, num_kv_heads, head_dim, dtype, device)
    slot_mapping = torch.tensor([-1, 44, 0, 12, -1, 13], device=device)
    k_cache, v_cache = _caches(9, 5, num_kv_heads, head_dim, dtype, device)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    guards = _guards(k_cache)
    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(_guards(k_cache), guards), "a padded row (slot -1) wrote outside its slot"
    write_kv_cache_reference(k, v, ref_k_cache, ref_v_cache, slot_mapping)
    assert torch.equal(k_cache, ref_k_cache) and torch.equal(v_cache, ref_v_cache)


def test_bad_inputs_raise_value_error() -> None:
    q, k, v = fused_qkv(3, 4, 2, 64, torch.float32, torch.device("cpu"))
    cache = cos_sin_cache(64, torch.device("cpu"))
    positions = torch.arange(3)
    with pytest.raises(ValueError, match="cos_sin_cache must be"):
        rotary_embedding(positions, q, k, cache[:, :32].contiguous())
    with pytest.raises(ValueError, match="positions must be"):
        rotary_embedding(positions.float(), q, k, cache)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rotary_embedding(positions, q.transpose(1, 2).contiguous().transpose(1, 2), k, cache)
    k_cache, v_cache = _caches(4, 5, 2, 64, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        rotary_embedding_write_kv_cache(positions, q, k, v, cache, k_cache, v_cache, torch.arange(3).int())
    with pytest.raises(ValueError, match="k_cache must be"):
        write_kv_cache(k, v, k_cache[:, :, :1], v_cache[:, :, :1], torch.arange(3))
    with pytest.raises(ValueError, match="v_cache must have"):
        write_kv_cache(k, v, k_cache, v_cache[:2], torch.arange(3))
