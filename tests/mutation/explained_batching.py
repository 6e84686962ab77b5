"""Explained survivors of `make mutate` in batching (see explained.py)."""

from tests.mutation.report import Explained

_SENTINEL_IDS = (
    "The free queue's two sentinel nodes are never handed out (popleft checks num_free_blocks first) and "
    "are compared by identity only (`block is not self._tail`); no code reads their block_id (the "
    "assertion messages print the block the caller passed), so the id they are built with cannot be "
    "observed."
)
_STRICTER_FAST_PATH = (
    "Only makes the guard of the decode fast path stricter (it now holds in a subset of the original "
    "cases). Whenever that guard holds, the general path below gives the same result: num_new_blocks is 0"
    " so nothing is taken or touched, num_full_blocks <= num_total_tokens // block_size <= the cached "
    "count so nothing is cached, and it returns an empty list too; skipping the shortcut costs time only."
)
_SWAP_IN_MESSAGE = (
    "Only the wording of an assertion message. The assertion holds by construction: a swapped-out table "
    "covers num_computed_tokens, which swap_in allocates again, so it only fires if a caller lowers "
    "num_computed_tokens between swap_out and swap_in."
)
_ZIP_NOT_STRICT = (
    "zip's `strict` is only tested for truth and defaults to False; None and the default behave like the "
    "original strict=False."
)
_ZIP_EQUAL_LENGTHS = (
    "host_ids is built with one pop per device id, so the two lists always have the same length and "
    "strict=True never fires (an empty host pool raises IndexError in pop() before zip runs); "
    "strict=False/None/default give the same pairs."
)
_EMPTY_CACHE_RANGE = (
    "With num_full_blocks == num_cached_blocks the call is cache_full_blocks over an empty range (a no-"
    "op; its length assertion holds since the table has cdiv(num_total_tokens, block_size) >= "
    "num_full_blocks blocks) and the stored count is set to the value it already has."
)
_PLAN_MESSAGE = (
    "Only the text of an assertion message, built only when the assertion fails. It cannot fail through "
    "the public API: a running request is planned up to _num_schedulable (at most num_tokens + 1) and a "
    "waiting one up to its known tokens, so end <= num_known + 1 always."
)
_RECORD_STATS_FALSY = (
    "get_computed_blocks only tests record_stats for truth (`if record_stats:`); None is falsy like False."
)

BATCHING: list[Explained] = [
    Explained(
        "batching/block_pool.py",
        "FreeBlockQueue.__init__",
        "self._head = KVCacheBlock(block_id=-1)",
        "self._head = KVCacheBlock(block_id=None)",
        _SENTINEL_IDS,
    ),
    Explained(
        "batching/block_pool.py",
        "FreeBlockQueue.__init__",
        "self._head = KVCacheBlock(block_id=-1)",
        "self._head = KVCacheBlock(block_id=+1)",
        _SENTINEL_IDS,
    ),
    Explained(
        "batching/block_pool.py",
        "FreeBlockQueue.__init__",
        "self._head = KVCacheBlock(block_id=-1)",
        "self._head = KVCacheBlock(block_id=-2)",
        _SENTINEL_IDS,
    ),
    Explained(
        "batching/block_pool.py",
        "FreeBlockQueue.__init__",
        "self._tail = KVCacheBlock(block_id=-1)",
        "self._tail = KVCacheBlock(block_id=None)",
        _SENTINEL_IDS,
    ),
    Explained(
        "batching/block_pool.py",
        "FreeBlockQueue.__init__",
        "self._tail = KVCacheBlock(block_id=-1)",
        "self._tail = KVCacheBlock(block_id=+1)",
        _SENTINEL_IDS,
    ),
    Explained(
        "batching/block_pool.py",
        "FreeBlockQueue.__init__",
        "self._tail = KVCacheBlock(block_id=-1)",
        "self._tail = KVCacheBlock(block_id=-2)",
        _SENTINEL_IDS,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.allocate_slots",
        "if num_total_tokens <= len(req_blocks) * self._block_size and (",
        "if num_total_tokens < len(req_blocks) * self._block_size and (",
        _STRICTER_FAST_PATH,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.allocate_slots",
        "if num_total_tokens <= len(req_blocks) * self._block_size and (",
        "if num_total_tokens <= len(req_blocks) / self._block_size and (",
        _STRICTER_FAST_PATH,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.allocate_slots",
        "not self.enable_caching\nor num_total_tokens // self._block_size <= self._num_cached_blocks.get(request.request_id, 0)",
        "not self.enable_caching and num_total_tokens // self._block_size <= self._num_cached_blocks.get(request.request_id, 0)",
        _STRICTER_FAST_PATH,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.allocate_slots",
        "or num_total_tokens // self._block_size <= self._num_cached_blocks.get(request.request_id, 0)",
        "or num_total_tokens / self._block_size <= self._num_cached_blocks.get(request.request_id, 0)",
        _STRICTER_FAST_PATH,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.allocate_slots",
        "or num_total_tokens // self._block_size <= self._num_cached_blocks.get(request.request_id, 0)",
        "or num_total_tokens // self._block_size < self._num_cached_blocks.get(request.request_id, 0)",
        _STRICTER_FAST_PATH,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.allocate_slots",
        "or num_total_tokens // self._block_size <= self._num_cached_blocks.get(request.request_id, 0)",
        "or num_total_tokens // self._block_size <= self._num_cached_blocks.get(None, 0)",
        _STRICTER_FAST_PATH,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.allocate_slots",
        "if num_full_blocks > num_cached_blocks:",
        "if num_full_blocks >= num_cached_blocks:",
        _EMPTY_CACHE_RANGE,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.swap_in",
        'assert len(new_blocks) >= len(host_ids), "a swapped-in table is smaller than its host copy"',
        'assert len(new_blocks) >= len(host_ids), "XXa swapped-in table is smaller than its host copyXX"',
        _SWAP_IN_MESSAGE,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.swap_in",
        'assert len(new_blocks) >= len(host_ids), "a swapped-in table is smaller than its host copy"',
        'assert len(new_blocks) >= len(host_ids), "A SWAPPED-IN TABLE IS SMALLER THAN ITS HOST COPY"',
        _SWAP_IN_MESSAGE,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.swap_in",
        "return [(h, b.block_id) for h, b in zip(host_ids, new_blocks, strict=False)]",
        "return [(h, b.block_id) for h, b in zip(host_ids, new_blocks, strict=None)]",
        _ZIP_NOT_STRICT,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.swap_in",
        "return [(h, b.block_id) for h, b in zip(host_ids, new_blocks, strict=False)]",
        "return [(h, b.block_id) for h, b in zip(host_ids, new_blocks, )]",
        _ZIP_NOT_STRICT,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.swap_out",
        "pairs = list(zip(device_ids, host_ids, strict=True))",
        "pairs = list(zip(device_ids, host_ids, strict=None))",
        _ZIP_EQUAL_LENGTHS,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.swap_out",
        "pairs = list(zip(device_ids, host_ids, strict=True))",
        "pairs = list(zip(device_ids, host_ids, ))",
        _ZIP_EQUAL_LENGTHS,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.swap_out",
        "pairs = list(zip(device_ids, host_ids, strict=True))",
        "pairs = list(zip(device_ids, host_ids, strict=False))",
        _ZIP_EQUAL_LENGTHS,
    ),
    Explained(
        "batching/scheduler.py",
        "Scheduler._plan",
        'assert end == num_known + 1, f"{request!r}: {end - num_known} pending tokens in one chunk"',
        'assert end == num_known + 1, f"{request!r}: {end + num_known} pending tokens in one chunk"',
        _PLAN_MESSAGE,
    ),
    Explained(
        "batching/scheduler.py",
        "Scheduler.schedule",
        "computed_blocks, num_hit_tokens = kv.get_computed_blocks(request, record_stats=False)",
        "computed_blocks, num_hit_tokens = kv.get_computed_blocks(request, record_stats=None)",
        _RECORD_STATS_FALSY,
    ),
    Explained(
        "batching/scheduler.py",
        "Scheduler.schedule",
        "preempted = False",
        "preempted = None",
        "preempted is only read as `not preempted` (the guard of the waiting-request loop) and is only ever "
        "set to True otherwise; None and False are both falsy, so the loop runs in exactly the same steps.",
    ),
]
