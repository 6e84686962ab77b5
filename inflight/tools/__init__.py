"""Command-line tools beside the engine: the Triton server launcher (`python -m inflight.tools.server`) and the
GGUF-to-Hugging-Face converter (`python -m inflight.tools.gguf_to_hf`). They import nothing from the backend."""
