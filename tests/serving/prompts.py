"""Prompts the serving tests share, so the engine-direct greedy reference is computed once for each."""

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 12  # for PROMPT (the answer goes on past it: finish_reason "length")
CHAT_MAX_TOKENS = 24  # for CHAT (the answer ends before it: finish_reason "stop")
