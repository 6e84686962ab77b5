"""`python -m inflight.gateway --triton-url HOST:PORT [--host H] [--port 9000] [--api-key K ...]`."""

from __future__ import annotations

import argparse
import os
import sys

from .app import DEFAULT_MAX_BODY_BYTES
from .triton import DEFAULT_LIVENESS_S

API_KEY_ENV = "INFLIGHT_API_KEY"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m inflight.gateway", description=__doc__)
    parser.add_argument("--triton-url", default=os.environ.get("TRITON_GRPC_URL", "localhost:8001"),
                        help="Triton's gRPC address, host:port (default localhost:8001)")  # fmt: skip
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT", 9000)))
    parser.add_argument(
        "--api-key", action="append", default=[],
        help=f"a key clients must send as `Authorization: Bearer KEY` (repeatable; also ${API_KEY_ENV}, "
        "comma-separated); none: no authentication",
    )  # fmt: skip
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per Triton request")
    parser.add_argument(
        "--liveness-s", type=float, default=DEFAULT_LIVENESS_S,
        help="a request with no response for this long checks that Triton is live and the model ready, and "
        "ends with a 503 if not (0: off)",
    )  # fmt: skip
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def api_keys(args: argparse.Namespace) -> list[str]:
    """--api-key values, then the environment's (comma-separated), without blanks or repeats."""
    keys = [*args.api_key, *os.environ.get(API_KEY_ENV, "").split(",")]
    return list(dict.fromkeys(k.strip() for k in keys if k.strip()))


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted."""
    import uvicorn

    from .app import create_app

    args = parse_args(argv)
    app = create_app(args.triton_url, api_keys(args), args.max_body_bytes, args.request_timeout,
                     args.liveness_s or None)  # fmt: skip
    print(f"inflight gateway: http://{args.host}:{args.port}/v1 -> Triton gRPC {args.triton_url}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
