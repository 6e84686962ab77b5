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

_JOIN_HAS_A_TABLE = (
    "The default of .get is never used: join_prompt_group's only caller, Scheduler.schedule, calls it right "
    "after allocate_slots (admission) or swap_in (which calls allocate_slots) returned a list, and "
    "allocate_slots for a request without a table skips its fast path (req_blocks is not None there) and "
    "takes the branch that runs req_to_blocks.setdefault(request_id, []) before returning anything but "
    "None; a swapped-out request's table is dropped by free but made again by swap_in's allocate_slots. "
    "So req_to_blocks holds the member's table at every call, and .get returns it with or without a default."
)
_LEADER_NEVER_MET = (
    "Unreachable: the waiting loop never meets a group with a leader, so `group.leader_id not in (None, "
    "request.request_id)` is always False there and this line never runs. leader_id is set only by "
    "plan_prompt_group for a chunk that ends below num_shared_tokens, and each chunk _plan gets is "
    "min(tokens left, budget) of a request whose schedulable tokens cover at least its whole prompt (more "
    "than num_shared_tokens): such a chunk is cut by the budget, which is then 0 and ends the step's "
    "planning (without chunked prefill no chunk ends inside a prompt at all: admission takes the whole "
    "prompt, running and swapped-in chunks start past it). Any free of the leader (finish, abort, "
    "preemption, swap-out) clears leader_id (_leave_prompt_group), so in every later step the leader is "
    "running, and the running loop, oldest first, either stops before it with budget 0, preempts "
    "(preempted: no admission that step), or plans it (it has tokens left, so it is not skipped): to its "
    "prompt's end (the blocks are published, leader_id None) or cut by the budget again (budget 0). So "
    "whenever the waiting loop runs (budget > 0, nothing preempted) no group has a leader. (Checked "
    "besides: 3,000 random scheduler runs with chunked prefill, prefix caching, swapping, aborts and "
    "overlapped steps, leaders set 8,169 times, never reached the line.)"
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
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.join_prompt_group",
        "table = self.req_to_blocks.get(request.request_id, [])",
        "table = self.req_to_blocks.get(request.request_id, None)",
        _JOIN_HAS_A_TABLE,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.join_prompt_group",
        "table = self.req_to_blocks.get(request.request_id, [])",
        "table = self.req_to_blocks.get(request.request_id, )",
        _JOIN_HAS_A_TABLE,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.join_prompt_group",
        "if len(table) >= len(group.blocks) and all(a is b for a, b in zip(table, group.blocks, strict=False)):",
        "if len(table) >= len(group.blocks) and all(a is b for a, b in zip(table, group.blocks, strict=None)):",
        _ZIP_NOT_STRICT,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.join_prompt_group",
        "if len(table) >= len(group.blocks) and all(a is b for a, b in zip(table, group.blocks, strict=False)):",
        "if len(table) >= len(group.blocks) and all(a is b for a, b in zip(table, group.blocks, )):",
        _ZIP_NOT_STRICT,
    ),
    Explained(
        "batching/kv_cache_manager.py",
        "KVCacheManager.plan_prompt_group",
        "assert group is not None and group.blocks is None",
        "assert group is not None or group.blocks is None",
        "Only weakens an assertion that always holds: plan_prompt_group's only caller, Scheduler._plan, calls "
        "it under `request.prompt_group is not None and request.prompt_group.blocks is None`. The mutated "
        "condition is implied by the original, so it passes whenever the original does; the code after it "
        "is unchanged.",
    ),
    Explained(
        "batching/scheduler.py",
        "Scheduler.schedule",
        "if not request.skip_prefix_cache:",
        "if request.skip_prefix_cache:",
        _LEADER_NEVER_MET,
    ),
    Explained(
        "batching/scheduler.py",
        "Scheduler.schedule",
        "break  # NOTE: another sequence of its prompt computes the shared blocks: wait, share",
        "return  # NOTE: another sequence of its prompt computes the shared blocks: wait, share",
        _LEADER_NEVER_MET,
    ),
]
