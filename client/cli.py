"""`python -m inflight.client "prompt" [--stream] [--chat] ...`: query a running inflight server."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from .client import InflightClient
from .types import InflightError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inflight.client", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    parser.add_argument("--system", help="a system message (implies --chat)")
    parser.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    parser.add_argument("--http", action="store_true", help="use HTTP generate endpoints instead of gRPC")
    parser.add_argument("--url", help="server address (default localhost:$GRPC_PORT or localhost:$HTTP_PORT)")
    parser.add_argument("--model", default="llm")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--min-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", default=None)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole request")
    return parser


def _summary(num_tokens: int, finish_reason: str | None, elapsed_s: float, ttft_s: float | None) -> str:
    """`[N tokens, finish_reason=..., TTFT x ms, y tok/s]`; TTFT and the decode rate only when streamed."""
    parts = [f"{num_tokens} tokens", f"finish_reason={finish_reason}"]
    if ttft_s is not None:
        decode_s = elapsed_s - ttft_s
        rate = (num_tokens - 1) / decode_s if num_tokens > 1 and decode_s > 0 else 0.0
        parts += [f"TTFT {ttft_s * 1000:.0f} ms", f"{rate:.1f} tok/s"]
    else:
        parts.append(f"{num_tokens / elapsed_s if elapsed_s > 0 else 0.0:.1f} tok/s")
    return f"[{', '.join(parts)}, total {elapsed_s:.2f} s]"


def main(argv: list[str] | None = None) -> int:
    """Run one request, print the answer on stdout and a summary line on stderr; 1 on a server error."""
    args = _parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    protocol = "http" if args.http else "grpc"
    port = os.environ.get("HTTP_PORT", "8000") if args.http else os.environ.get("GRPC_PORT", "8001")
    client = InflightClient(args.url or f"localhost:{port}", args.model, protocol, timeout_s=args.timeout)
    sampling: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "min_tokens": args.min_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
    }
    if args.chat or args.system:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        request: dict[str, Any] = {"messages": [*messages, {"role": "user", "content": prompt}]}
    else:
        request = {"prompt": prompt}
    start = time.monotonic()
    first: float | None = None
    try:
        if args.stream:
            num_tokens, finish_reason = 0, None
            for delta in client.stream(**request, **sampling):
                if first is None and (delta.text or delta.token_ids):
                    first = time.monotonic()
                print(delta.text, end="", flush=True)
                num_tokens += len(delta.token_ids)
                finish_reason = delta.finish_reason or finish_reason
            print(flush=True)
        else:
            result = client.generate(**request, **sampling)
            print(result.text, flush=True)
            num_tokens = result.num_output_tokens or len(result.token_ids)
            finish_reason = result.finish_reason
    except InflightError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    ttft_s = first - start if first is not None else None
    print(_summary(num_tokens, finish_reason, time.monotonic() - start, ttft_s), file=sys.stderr)
    return 0
