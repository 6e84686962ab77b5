"""Serving benchmarks: perf_analyzer and genai-perf against the inflight model (`make perf`)."""
