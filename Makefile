# inflight: `make serve` and `make test` are all a fresh clone needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CACHE := .cache
MODEL_DIR := $(CACHE)/models/SmolLM2-135M-Instruct
# The CPU build of torch that this machine keeps as a local file; on a GPU machine pip takes the CUDA one.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# The OpenAI-compatible gateway (docs/gateway.md) that `make serve` starts beside Triton; API keys: INFLIGHT_API_KEY.
GATEWAY_PORT ?= 9000
# MODEL=<HF checkpoint folder> serves another checkpoint instead of the default one; SERVE_ARGS adds config
# parameters, e.g. SERVE_ARGS="--param quantization=fp8 --param kv_cache_dtype=fp8" (docs/fp8.md).
MODEL ?=
SERVE_ARGS ?=

PERF_ARGS ?=
# `make bench BENCH_MODEL=<HF folder>` on a GPU; BENCH_ARGS="--only serving" etc. (python -m benchmarks.bench -h)
BENCH_MODEL ?=
BENCH_ARGS ?=

.PHONY: setup model serve perf bench bench-carry quality quality-carry test test-gpu mutate gpu-carry lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import torch' 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[test]'
	@touch $@

model: $(MODEL_DIR)/config.json

$(MODEL_DIR)/config.json: | $(STAMP)
	$(PY) -m inflight.tools.gguf_to_hf --default-model --out $(MODEL_DIR) --workdir $(CACHE)

serve: setup model
	$(PY) -m inflight.tools.server --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) \
		--metrics-port $(METRICS_PORT) --gateway-port $(GATEWAY_PORT) $(if $(MODEL),--model "$(MODEL)") $(SERVE_ARGS)

# Throughput and latency through the real server: perf_analyzer, then genai-perf (vllm and tensorrtllm modes
# against `llm`, tensorrtllm mode against TensorRT-LLM's `ensemble`), then genai-perf's OpenAI mode against the gateway.
perf: setup model
	$(PY) -m benchmarks.perf --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --gateway-port $(GATEWAY_PORT) \
		$(if $(MODEL),--model "$(MODEL)") $(PERF_ARGS)

# The benchmark set (benchmarks/bench.py), sized for the device: offline throughput with its HF peers and
# serving through Triton vs engine-direct; JSON + PNG in benchmarks/results/, then the README table.
bench: setup model
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PIP) install -q -e '.[bench]'
	$(PY) -m benchmarks.bench $(if $(BENCH_MODEL),--model "$(BENCH_MODEL)") $(BENCH_ARGS)

# FP8 quality (benchmarks/quality.py): perplexity of the default model in full precision, with
# quantization=fp8 and with kv_cache_dtype=fp8 too, against HF and an HF fake-quant reference; non-zero when a
# bound is missed; JSON in benchmarks/results/quality-<tag>.json and the README's block. A few minutes on the
# 2-core CPU. QUALITY_ARGS="--windows 48", or on a GPU "--device cuda --model M --wheel W".
QUALITY_ARGS ?=
# Its text: the Wikipedia sample dump that the gensim 4.4.0 wheel ships (CC BY-SA: read from the wheel at run
# time, never committed), downloaded once by pip.
GENSIM_WHEEL := $(CACHE)/wheels/.gensim-4.4.0.downloaded

quality: setup model $(GENSIM_WHEEL)
	$(PY) -m benchmarks.quality $(QUALITY_ARGS)

$(GENSIM_WHEEL): | $(STAMP)
	$(PIP) download -q gensim==4.4.0 --no-deps --only-binary=:all: -d $(CACHE)/wheels
	@touch $@

# What a GPU machine without network needs for the benchmarks, the served one included (git-ignored .gpu/):
# the tokenizer files, and the Triton server + numpy 1.26 + tritonclient bundle of ../shared/gpu.
bench-carry: gpu-carry
	bash ../shared/gpu/make-bundle.sh .gpu

# The CPU suite (CI). tests/gpu needs a CUDA GPU: `make test-gpu` runs it with the kernels on CUDA.
test: setup model $(GENSIM_WHEEL)
	$(PY) -m pytest -q tests --ignore=tests/gpu

# Issue 6: every reliability scenario at full size through the real server, then a table; non-zero on any
# failure (about 30 minutes on a 2-core CPU). `make test` runs the same scenarios at their fast sizes.
reliability: setup model
	$(PY) -m tests.reliability

# Mutation testing (tests/mutation): mutmut puts small bugs into batching/, the sampler, the detokenizer and the
# finish decision, one at a time; the unit tests must catch each. Writes docs/mutation.md and the README's score;
# fails on a survivor not explained in tests/mutation/explained.py. Not part of `make test` (too slow for CI).
MUTATE_ARGS ?=
mutate: setup model
	@$(PY) -c 'import mutmut' 2>/dev/null || $(PIP) install -q -e '.[mutate]'
	$(PY) -m tests.mutation $(MUTATE_ARGS)

test-gpu: setup
	$(PY) -m pytest -q tests/gpu tests/kernels

# `make quality` on a GPU machine (no network, at most 64 MiB carried a run): the default model's GGUF in two
# halves and the gensim + gguf wheels, in three git-ignored folders carried by three runs made back to back
# (files a run leaves there stay while the machine is warm); docs/fp8.md, "Quality", has the commands.
quality-carry: model $(GENSIM_WHEEL)
	rm -rf .gpu/quality-a .gpu/quality-b .gpu/quality-c && mkdir -p .gpu/quality-a .gpu/quality-b .gpu/quality-c
	split -n 2 -d $(CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf .gpu/quality-x.
	mv .gpu/quality-x.00 .gpu/quality-a/ && mv .gpu/quality-x.01 .gpu/quality-b/
	cp $(CACHE)/wheels/gensim-4.4.0-*.whl .gpu/quality-c/
	$(PIP) download -q gguf==0.19.0 --no-deps -d .gpu/quality-c

# What a GPU machine without network needs beside the checkout (git-ignored; name `.gpu/tok` in the device
# tool's carry): the tokenizer files for the GPU tests' tiny checkpoints and the benchmarks' 8B-shaped one.
gpu-carry: model
	mkdir -p .gpu/tok
	cp $(MODEL_DIR)/tokenizer.json $(MODEL_DIR)/tokenizer_config.json $(MODEL_DIR)/chat_template.jinja .gpu/tok/
	$(PIP) download -q "llguidance==1.9.1" --no-deps -d .gpu/tok

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:randomly tests/test_architecture.py  # the floors' import contracts (import-linter)

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(CACHE) .pytest_cache .ruff_cache *.egg-info
