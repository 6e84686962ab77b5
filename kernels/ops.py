"""The operations the model layers call, dispatched by device.

NOTE: today every device runs the torch references; the OpenAI Triton kernels plug in here, chosen by
``tensor.is_cuda``, so the layers never change.
"""

from __future__ import annotations

from .activation import silu_and_mul_reference as silu_and_mul
from .paged_attention import paged_attention_reference as paged_attention
from .paged_attention import write_kv_cache_reference as write_kv_cache
from .rms_norm import rms_norm_reference as rms_norm
from .rotary import rotary_embedding_reference as rotary_embedding

__all__ = ["paged_attention", "rms_norm", "rotary_embedding", "silu_and_mul", "write_kv_cache"]
