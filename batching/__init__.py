"""Batching (under the engine floor): request bookkeeping, KV block pool, prefix cache, KV-cache manager
and the scheduler, whose `SchedulerOutput` plans each step. Pure Python: never imports torch.
May import: nothing of inflight (the engine, the executor and serving import it)."""

from .block_hash import BlockHash, compute_block_hashes, hash_block_tokens
from .block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from .kv_cache_manager import KVCacheManager, PrefixCacheStats
from .prompt_group import PromptGroup
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
    "PromptGroup",
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
