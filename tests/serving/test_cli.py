"""`python -m inflight.client`: prints the streamed answer on stdout and a summary on stderr."""

from __future__ import annotations

import subprocess
import sys

from .prompts import CHAT, CHAT_MAX_TOKENS, MAX_TOKENS, PROMPT


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "inflight.client", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_cli_streams_the_greedy_answer(triton_server, greedy_reference) -> None:
    expected = greedy_reference(PROMPT, MAX_TOKENS)
    done = _cli(PROMPT, "--stream", "--max-tokens", str(MAX_TOKENS), "--temperature", "0",
                "--url", triton_server.url_grpc)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
    summary = done.stderr.strip().splitlines()[-1]
    assert f"{MAX_TOKENS} tokens" in summary and "finish_reason=length" in summary and "TTFT" in summary


def test_cli_chat_over_http(triton_server, greedy_reference) -> None:
    expected = greedy_reference(CHAT, CHAT_MAX_TOKENS)
    done = _cli(CHAT[0]["content"], "--chat", "--http", "--max-tokens", str(CHAT_MAX_TOKENS),
                "--temperature", "0", "--url", triton_server.url_http)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n" and "Paris" in done.stdout
    assert "finish_reason=stop" in done.stderr


def test_cli_reports_server_errors(triton_server) -> None:
    done = _cli("Hello", "--max-tokens", "0", "--http", "--url", triton_server.url_http)
    assert done.returncode == 1
    assert "INVALID_ARG" in done.stderr and "max_tokens must be at least 1" in done.stderr
