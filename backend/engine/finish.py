"""The finish decision for one newly sampled token: whether it ends its request, and why.

A token ends its request when, in this order of precedence:

1. it is a stop token (a `stop_token_ids` entry, or EOS unless `ignore_eos`): finish_reason "stop", the
   stop reason is the token id (the token stays in the output ids);
2. its text completed a stop string (the detokenizer found it): "stop", the stop reason is that string;
3. it is the request's `max_tokens`-th output token: "length", no stop reason. `max_tokens` is the
   request's `max_output_tokens`, which the scheduler clamped at admission to the room its prompt leaves
   under `max_model_len`, so a sequence that reaches `max_model_len` ends here too, and only here.

The sampler bans EOS and the stop ids while fewer than `min_tokens` are out, so a stop token that reaches
this check is always allowed to end the request.
"""

from __future__ import annotations

from collections.abc import Container


def check_stop(
    token_id: int,
    stop_string: str | None,
    num_output_tokens: int,
    stop_token_ids: Container[int],
    max_tokens: int,
) -> tuple[str, str | int | None] | None:
    """(finish_reason, stop_reason) if the token `token_id` ends its request, else None.

    `num_output_tokens` counts the request's output tokens with this one;
    `stop_string` is the stop string the token's text completed, if any.
    """
    # NOTE: positional arguments and a tuple: the engine calls this for every sampled token.
    if token_id in stop_token_ids:
        return "stop", token_id
    if stop_string is not None:
        return "stop", stop_string
    if num_output_tokens >= max_tokens:
        return "length", None
    return None
