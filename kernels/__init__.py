"""Compute primitives of the engine.

Each operation has a plain torch reference (the CPU path, and the oracle for tests); OpenAI Triton
kernels sit beside the references and are chosen by device in `inflight.kernels.ops`.
"""
