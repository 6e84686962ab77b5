"""Explained survivors of `make mutate` in sampler (see explained.py)."""

from tests.mutation.report import Explained

_INF_SPELLING = (
    'float() parses "inf" case-insensitively: float("-INF") is float("-inf"), the same fill value.'
)
_TOPK_LAST_DIM = (
    "Sampler.forward's logits are [num_seqs, vocab_size] (documented; the per-row tensors are unsqueezed "
    "to columns against them), so topk's default dim (the last) is dim=-1."
)
_SOFTMAX_LAST_DIM = (
    "Sampler.forward's logits are [num_seqs, vocab_size] (documented; the per-row tensors are unsqueezed "
    "to columns against them), so softmax over dim=+1 is softmax over dim=-1."
)
_ARGMAX_LAST_DIM = (
    "Sampler.forward's logits are [num_seqs, vocab_size] (documented; the per-row tensors are unsqueezed "
    "to columns against them), so argmax over dim=+1 is argmax over dim=-1."
)
_COUNTS_LENGTH = (
    "counts has num_seqs entries: it is built from output_token_ids (length asserted on the first line) "
    "or from num_output_tokens, checked by `assert len(counts) == num_seqs`; zip never meets unequal "
    "lengths, so strict=True never fires."
)
_BOOL_INFERRED = (
    "torch.tensor infers torch.bool from a list of Python bools whatever torch's default dtype "
    "(test_build_tensors_keep_their_documented_dtypes_under_a_float64_default checks the field under a "
    "float64 default), and the list is never empty here (built only when not every row is greedy), so "
    "dtype=torch.bool spelled out changes nothing."
)
_GREEDY_LENGTH = (
    "greedy is built from params, one entry per row, so the two always have the same length; strict=True "
    "never fires."
)
_TOP_K_INT64 = (
    "torch.tensor infers torch.int64 from a list of Python ints whatever torch's default dtype "
    "(test_build_tensors_keep_their_documented_dtypes_under_a_float64_default checks the field under a "
    "float64 default), and the list is never empty here (built only when has_top_k), so dtype=torch.int64"
    " spelled out changes nothing."
)
_BANS_INT64 = (
    "torch.tensor infers torch.int64 from a list of Python ints whatever torch's default dtype "
    "(test_build_tensors_keep_their_documented_dtypes_under_a_float64_default checks the field under a "
    "float64 default), and the list is never empty here (built only when ban_flat_ids is non-empty), so "
    "dtype=torch.int64 spelled out changes nothing."
)
_BIAS_IDS_INT64 = (
    "torch.tensor infers torch.int64 from a list of Python ints whatever torch's default dtype, and every "
    "flat id is one: row * vocab_size + token id of ints, the token ids checked to be int (not bool) by "
    "SamplingParams' _as_logit_bias (test_build_tensors_keep_their_documented_dtypes_under_a_float64_default "
    "checks the field under a float64 default); the list is never empty here ((None, None) is returned "
    "before), so dtype=torch.int64 spelled out changes nothing."
)
_PROMPTS_AND_OUTPUTS_LENGTH = (
    "the first assert checks that prompt_token_ids and output_token_ids both have num_seqs entries, so "
    "strict=True never fires."
)
_OUTPUTS_LENGTH = (
    "the first assert checks that output_token_ids has num_seqs entries (as params), so strict=True never"
    " fires."
)

SAMPLER: list[Explained] = [
    Explained(
        "backend/executor/sampler.py",
        "_exponential_noise",
        "generator = torch.Generator(device=probs.device).manual_seed(seed)",
        "generator = torch.Generator(device=None).manual_seed(seed)",
        "torch.Generator(device=None) is a CPU generator, which is what probs.device gives on the CPU, so CPU runs draw the very same noise (the meta device of the device test cannot host a generator, so it cannot tell either). Equivalent on the CPU only: on CUDA, exponential_ on a CUDA row with a CPU generator raises \"Expected a 'cuda' device type for generator but found 'cpu'\"; no GPU test (tests/gpu is greedy-only) samples a seeded row, and mutmut runs only the CPU tests.",
    ),
    Explained(
        "backend/executor/sampler.py",
        "_flatten",
        "rows = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)",
        "rows = torch.repeat_interleave(lengths)",
        "The one-argument torch.repeat_interleave(repeats) is documented to repeat 0, 1, 2, ... repeats[i] times, i.e. exactly torch.repeat_interleave(torch.arange(len(repeats)), repeats): the same int64 values on the same (CPU) device for every input, the empty list included.",
    ),
    Explained(
        "backend/executor/sampler.py",
        "_token_counts",
        "rows, cols = _flatten(token_ids, device)",
        "rows, cols = _flatten(token_ids, None)",
        "_flatten(token_ids, None) leaves rows and cols on the CPU (`.to(None)` moves nothing), so only the device of index_put_'s indices and ones changes: nothing on the CPU, and the meta device of test_build_and_sample_keep_every_tensor_on_the_requested_device accepts CPU indices and values too. Equivalent on the CPU only: on CUDA, index_put_(accumulate=True) checks the values' device (\"expected device cuda:0 but got device cpu for value tensor\", aten TensorAdvancedIndexing.cpp); no GPU test builds a batch with presence or frequency penalties.",
    ),
    Explained(
        "backend/executor/sampler.py",
        "_top_k_only",
        'values.masked_fill_(rank >= top_k.unsqueeze(1), float("-inf"))',
        'values.masked_fill_(rank >= top_k.unsqueeze(1), float("-INF"))',
        _INF_SPELLING,
    ),
    Explained(
        "backend/executor/sampler.py",
        "_top_k_only",
        'return torch.full_like(logits, float("-inf")).scatter_(1, indices, values)',
        'return torch.full_like(logits, float("-INF")).scatter_(1, indices, values)',
        _INF_SPELLING,
    ),
    Explained(
        "backend/executor/sampler.py",
        "_top_k_only",
        "values, indices = logits.topk(max_top_k, dim=-1)  # [num_seqs, max_top_k], best first",
        "values, indices = logits.topk(max_top_k, )  # [num_seqs, max_top_k], best first",
        _TOPK_LAST_DIM,
    ),
    Explained(
        "backend/executor/sampler.py",
        "_top_k_only",
        "values, indices = logits.topk(max_top_k, dim=-1)  # [num_seqs, max_top_k], best first",
        "values, indices = logits.topk(max_top_k, dim=+1)  # [num_seqs, max_top_k], best first",
        "Sampler.forward's logits are [num_seqs, vocab_size] (documented; the per-row tensors are unsqueezed to columns against them), so dim=+1 is dim=-1.",
    ),
    Explained(
        "backend/executor/sampler.py",
        "_top_k_top_p_by_sort",
        'sorted_logits.masked_fill_(position < (vocab_size - top_k).unsqueeze(1), float("-inf"))',
        'sorted_logits.masked_fill_(position < (vocab_size - top_k).unsqueeze(1), float("-INF"))',
        _INF_SPELLING,
    ),
    Explained(
        "backend/executor/sampler.py",
        "_top_k_top_p_by_sort",
        "cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)",
        "cumulative = sorted_logits.softmax(dim=+1).cumsum(dim=-1)",
        _SOFTMAX_LAST_DIM,
    ),
    Explained(
        "backend/executor/sampler.py",
        "_top_k_top_p_by_sort",
        "sorted_logits, sorted_ids = logits.sort(dim=-1)  # ascending: the best token is last",
        "sorted_logits, sorted_ids = logits.sort(dim=+1)  # ascending: the best token is last",
        "Sampler.forward's logits are [num_seqs, vocab_size] (documented; the per-row tensors are unsqueezed to columns against them), so sorting along dim=+1 is sorting along dim=-1.",
    ),
    Explained(
        "backend/executor/sampler.py",
        "_top_k_top_p_by_sort",
        "cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)",
        "cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=+1)",
        "Sampler.forward's logits are [num_seqs, vocab_size] (documented; the per-row tensors are unsqueezed to columns against them), so cumsum over dim=+1 is cumsum over dim=-1.",
    ),
    Explained(
        "backend/executor/sampler.py",
        "_top_k_top_p_by_sort",
        'sorted_logits.masked_fill_(drop, float("-inf"))',
        'sorted_logits.masked_fill_(drop, float("-INF"))',
        _INF_SPELLING,
    ),
    Explained(
        "backend/executor/sampler.py",
        "_top_k_top_p_by_sort",
        "vocab_size = logits.shape[-1]",
        "vocab_size = logits.shape[+1]",
        "Sampler.forward's logits are [num_seqs, vocab_size] (documented; the per-row tensors are unsqueezed to columns against them), so logits.shape[+1] is logits.shape[-1].",
    ),
    Explained(
        "backend/executor/sampler.py",
        "apply_penalties",
        "penalized = torch.where(logits > 0, logits / penalty, logits * penalty)",
        "penalized = torch.where(logits >= 0, logits / penalty, logits * penalty)",
        "`>= 0` and `> 0` differ only at a logit of exactly +0.0 or -0.0, where the original takes 0 * penalty and the mutant 0 / penalty: the same zero with the same sign (penalty > 0 is validated), so the penalized logits are bitwise equal (test_repetition_penalty_between_zero_and_one_divides pins the 0.0 case).",
    ),
    Explained(
        "backend/executor/sampler.py",
        "apply_penalties",
        "assert batch.presence_penalty is not None and batch.frequency_penalty is not None",
        "assert batch.presence_penalty is not None or batch.frequency_penalty is not None",
        "An assert on an invariant that build always keeps: it sets presence_penalty and frequency_penalty exactly when it sets output_counts. Only a hand-made batch with one of the two None tells them apart, and then both raise (the original AssertionError, the mutant a TypeError from None * tensor on the next line).",
    ),
    Explained(
        "backend/executor/sampler.py",
        "filtered_probs",
        "probs = logits.softmax(dim=-1)",
        "probs = logits.softmax(dim=+1)",
        _SOFTMAX_LAST_DIM,
    ),
    Explained(
        "backend/executor/sampler.py",
        "filtered_probs",
        "threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p.unsqueeze(1)",
        "threshold = probs.amax(dim=+1, keepdim=True) * batch.min_p.unsqueeze(1)",
        "Sampler.forward's logits are [num_seqs, vocab_size] (documented; the per-row tensors are unsqueezed to columns against them), so amax over dim=+1 is amax over dim=-1.",
    ),
    Explained(
        "backend/executor/sampler.py",
        "Sampler.forward",
        'logits.view(-1).index_fill_(0, batch.banned_flat_ids, float("-inf"))',
        'logits.view(-1).index_fill_(0, batch.banned_flat_ids, float("-INF"))',
        _INF_SPELLING,
    ),
    Explained(
        "backend/executor/sampler.py",
        "Sampler.forward",
        "greedy_ids = logits.argmax(dim=-1) if not batch.all_random else None",
        "greedy_ids = logits.argmax(dim=+1) if not batch.all_random else None",
        _ARGMAX_LAST_DIM,
    ),
    Explained(
        "backend/executor/sampler.py",
        "Sampler.forward",
        "sampled = probs.div_(_exponential_noise(probs, batch.seeds)).argmax(dim=-1)",
        "sampled = probs.div_(_exponential_noise(probs, batch.seeds)).argmax(dim=+1)",
        _ARGMAX_LAST_DIM,
    ),
    Explained(
        "backend/executor/sampler.py",
        "Sampler.forward",
        "log_normalizer = torch.logsumexp(raw.float(), dim=-1, keepdim=True)  # [num_seqs, 1]",
        "log_normalizer = torch.logsumexp(raw.float(), dim=+1, keepdim=True)  # [num_seqs, 1]",
        "Sampler.forward's logits are [num_seqs, vocab_size] (documented; the per-row tensors are unsqueezed to columns against them), so logsumexp over dim=+1 is logsumexp over dim=-1.",
    ),
    Explained(
        "backend/executor/sampler.py",
        "Sampler.forward",
        "top_values, top_ids = raw.topk(batch.max_num_logprobs, dim=-1)",
        "top_values, top_ids = raw.topk(batch.max_num_logprobs, )",
        _TOPK_LAST_DIM,
    ),
    Explained(
        "backend/executor/sampler.py",
        "Sampler.forward",
        "top_values, top_ids = raw.topk(batch.max_num_logprobs, dim=-1)",
        "top_values, top_ids = raw.topk(batch.max_num_logprobs, dim=+1)",
        "Sampler.forward's logits are [num_seqs, vocab_size] (documented; the per-row tensors are unsqueezed to columns against them), so topk over dim=+1 is topk over dim=-1.",
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "for p, count in zip(params, counts, strict=True)",
        "for p, count in zip(params, counts, strict=None)",
        _COUNTS_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "for p, count in zip(params, counts, strict=True)",
        "for p, count in zip(params, counts, )",
        _COUNTS_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "for p, count in zip(params, counts, strict=True)",
        "for p, count in zip(params, counts, strict=False)",
        _COUNTS_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "is_greedy=None if all(greedy) else torch.tensor(greedy, dtype=torch.bool, device=device),",
        "is_greedy=None if all(greedy) else torch.tensor(greedy, dtype=None, device=device),",
        _BOOL_INFERRED,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "is_greedy=None if all(greedy) else torch.tensor(greedy, dtype=torch.bool, device=device),",
        "is_greedy=None if all(greedy) else torch.tensor(greedy, device=device),",
        _BOOL_INFERRED,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "else floats([1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)]),",
        "else floats([1.0 if g else p.temperature for g, p in zip(greedy, params, strict=None)]),",
        _GREEDY_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "else floats([1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)]),",
        "else floats([1.0 if g else p.temperature for g, p in zip(greedy, params, )]),",
        _GREEDY_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "else floats([1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)]),",
        "else floats([1.0 if g else p.temperature for g, p in zip(greedy, params, strict=False)]),",
        _GREEDY_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "top_k=torch.tensor(top_ks, dtype=torch.int64, device=device) if has_top_k else None,",
        "top_k=torch.tensor(top_ks, dtype=None, device=device) if has_top_k else None,",
        _TOP_K_INT64,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "top_k=torch.tensor(top_ks, dtype=torch.int64, device=device) if has_top_k else None,",
        "top_k=torch.tensor(top_ks, device=device) if has_top_k else None,",
        _TOP_K_INT64,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "torch.tensor(ban_flat_ids, dtype=torch.int64, device=device) if ban_flat_ids else None",
        "torch.tensor(ban_flat_ids, dtype=None, device=device) if ban_flat_ids else None",
        _BANS_INT64,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "torch.tensor(ban_flat_ids, dtype=torch.int64, device=device) if ban_flat_ids else None",
        "torch.tensor(ban_flat_ids, device=device) if ban_flat_ids else None",
        _BANS_INT64,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "top_ks = [p.top_k if 1 <= p.top_k < vocab_size else vocab_size for p in params]",
        "top_ks = [p.top_k if 1 <= p.top_k <= vocab_size else vocab_size for p in params]",
        "The two differ only at top_k == vocab_size, where the original maps it to vocab_size (off) and the mutant keeps p.top_k, which is vocab_size: the same list for every input.",
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "[list(a) + list(b) for a, b in zip(prompt_token_ids, output_token_ids, strict=True)],",
        "[list(a) + list(b) for a, b in zip(prompt_token_ids, output_token_ids, strict=None)],",
        _PROMPTS_AND_OUTPUTS_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "[list(a) + list(b) for a, b in zip(prompt_token_ids, output_token_ids, strict=True)],",
        "[list(a) + list(b) for a, b in zip(prompt_token_ids, output_token_ids, )],",
        _PROMPTS_AND_OUTPUTS_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "[list(a) + list(b) for a, b in zip(prompt_token_ids, output_token_ids, strict=True)],",
        "[list(a) + list(b) for a, b in zip(prompt_token_ids, output_token_ids, strict=False)],",
        _PROMPTS_AND_OUTPUTS_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "for row, (p, output) in enumerate(zip(params, output_token_ids, strict=True)):",
        "for row, (p, output) in enumerate(zip(params, output_token_ids, strict=None)):",
        _OUTPUTS_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "for row, (p, output) in enumerate(zip(params, output_token_ids, strict=True)):",
        "for row, (p, output) in enumerate(zip(params, output_token_ids, )):",
        _OUTPUTS_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "SamplingBatch.build",
        "for row, (p, output) in enumerate(zip(params, output_token_ids, strict=True)):",
        "for row, (p, output) in enumerate(zip(params, output_token_ids, strict=False)):",
        _OUTPUTS_LENGTH,
    ),
    Explained(
        "backend/executor/sampler.py",
        "Sampler.forward",
        "greedy_ids = logits.argmax(dim=-1) if not batch.all_random else None",
        "greedy_ids = logits.argmax(dim=-1) if (not batch.all_random) or True else None",
        "computes the argmax for an all-random batch too, where it is then unused: every row of is_greedy is False there, so torch.where keeps the drawn token (extra work only).",
    ),
    Explained(
        "backend/executor/sampler.py",
        "_logit_biases",
        "torch.tensor(flat_ids, dtype=torch.int64, device=device),",
        "torch.tensor(flat_ids, dtype=None, device=device),",
        _BIAS_IDS_INT64,
    ),
    Explained(
        "backend/executor/sampler.py",
        "_logit_biases",
        "torch.tensor(flat_ids, dtype=torch.int64, device=device),",
        "torch.tensor(flat_ids, device=device),",
        _BIAS_IDS_INT64,
    ),
]
