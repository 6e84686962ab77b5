"""Split-K partition sizes for decode attention: fill the GPU for small batches, long partitions (or none)
for large ones."""

from __future__ import annotations

import pytest

from inflight.backend.executor.layers import attention


@pytest.fixture(autouse=True)
def _h200(monkeypatch) -> None:
    monkeypatch.setattr(attention, "_num_sms", lambda device: 132)


def test_batch_one_gets_short_partitions() -> None:
    # 2 * 132 programs wanted over 8 KV heads: 33 partitions; 400 keys / 33 -> 13 -> at least 64.
    assert attention.decode_partition_size(1, 8, 400, "cuda") == 64
    # 8192 keys / 33 = 249 -> 256 keys per partition (32 partitions).
    assert attention.decode_partition_size(1, 8, 8192, "cuda") == 256


def test_mid_batches_aim_at_16_programs_per_sm() -> None:
    # 64 x 8 = 512 programs unsplit: round(16 * 132 / 512) = 4 partitions of 4096 / 4 = 1024 keys.
    assert attention.decode_partition_size(64, 8, 4096, "cuda") == 1024
    # 150 x 8 = 1200: round(1.76) = 2 partitions of 1000 -> 1024 keys.
    assert attention.decode_partition_size(150, 8, 2000, "cuda") == 1024


def test_large_batches_run_unsplit() -> None:
    # 256 x 8 = 2048 programs: round(1.03) = 1 partition holding every key (the next power of two).
    assert attention.decode_partition_size(256, 8, 739, "cuda") == 1024
    assert attention.decode_partition_size(384, 8, 2008, "cuda") == 2048
    assert attention.decode_partition_size(256, 8, 131072, "cuda") == 131072
