"""Split-K partition sizes for decode attention: fill the GPU for small batches, stay 512 for large ones."""

from __future__ import annotations

import pytest

from inflight.backend.layers import attention


@pytest.fixture(autouse=True)
def _h200(monkeypatch) -> None:
    monkeypatch.setattr(attention, "_num_sms", lambda device: 132)


def test_batch_one_gets_short_partitions() -> None:
    # 2 * 132 programs wanted over 8 KV heads: 33 partitions; 400 keys / 33 -> 13 -> at least 64.
    assert attention.decode_partition_size(1, 8, 400, "cuda") == 64
    # 8192 keys / 33 = 249 -> 256 keys per partition (32 partitions).
    assert attention.decode_partition_size(1, 8, 8192, "cuda") == 256


def test_large_batches_keep_512() -> None:
    assert attention.decode_partition_size(64, 8, 4096, "cuda") == 512
    assert attention.decode_partition_size(256, 8, 131072, "cuda") == 512
