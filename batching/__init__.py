"""Request bookkeeping, KV block pool, prefix cache, KV-cache manager and scheduler. Pure Python."""

from .block_hash import BlockHash, compute_block_hashes, hash_block_tokens
from .block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from .kv_cache_manager import KVCacheManager, PrefixCacheStats
from .request import Request, RequestStatus
from .scheduler import (
    PENDING_TOKEN_ID,
    QueueFullError,
    ScheduledRequest,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    SchedulerStats,
)

__all__ = [
    "BlockHash",
    "BlockPool",
    "FreeBlockQueue",
    "KVCacheBlock",
    "KVCacheManager",
    "PrefixCacheStats",
    "PENDING_TOKEN_ID",
    "QueueFullError",
    "Request",
    "RequestStatus",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
    "compute_block_hashes",
    "hash_block_tokens",
]
