"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm), SmolLM2 (tied embeddings).

One definition covers them; the differences are flags of ``ModelConfig``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from inflight.backend.executor.layers.activation import SiluAndMul
from inflight.backend.executor.layers.attention import Attention
from inflight.backend.executor.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from inflight.backend.executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from inflight.backend.executor.layers.norm import RMSNorm
from inflight.backend.executor.layers.rotary import RotaryEmbedding
from inflight.backend.executor.model_config import ModelConfig
from inflight.backend.executor.parallel import SINGLE_RANK, ParallelConfig
from inflight.backend.executor.quantization import QuantConfig, linear_method
from inflight.backend.executor.step_inputs import AttentionMetadata

# checkpoint name piece -> (our fused parameter's name piece, shard id)
_FUSED_SHARDS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# An FP8 checkpoint's K/V cache scales, by layout: compressed-tensors (and AutoFP8) ``self_attn.k_scale``;
# ModelOpt ``self_attn.k_proj.k_scale``; older compressed-tensors ``self_attn.k_proj.output_scale``.
_KV_SCALE = re.compile(r"(.*\.self_attn)\.(?:([kv])_proj\.(?:[kv]|output)_scale|([kv])_scale)$")


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_index: int,
        dtype: torch.dtype,
        max_position: int,
        parallel: ParallelConfig,
        quant: QuantConfig | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_index}.self_attn"
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, dtype, parallel,
            linear_method(quant, f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"),
        )  # fmt: skip
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.o_proj_bias, dtype, parallel,
            linear_method(quant, f"{prefix}.o_proj"),
        )  # fmt: skip
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        rotary = RotaryEmbedding(cfg.head_dim, cfg.head_dim, max_position, cfg.rope)
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            cfg.head_dim,
            cfg.head_dim**-0.5,
            rotary,
            cfg.sliding_windows[layer_index],
            kv_cache_dtype,
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(hidden), meta)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata,
               residual: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Everything after the qkv projection: (q/k norm,) RoPE, the cache write, attention, o_proj (whose
        product is added to ``residual`` when given, over it). ``rows``: o_proj runs on these rows only
        (of the attention output and of ``residual``), in that order; every token's K/V is cached."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        out = self.attn(positions, q, k, v, meta)
        if rows is not None:
            out = out.index_select(0, rows)
            residual = None if residual is None else residual.index_select(0, rows)
        return self.o_proj(out, residual)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, dtype: torch.dtype, parallel: ParallelConfig,
                 quant: QuantConfig | None = None) -> None:  # fmt: skip
        super().__init__()
        size = cfg.intermediate_size
        prefix = f"model.layers.{layer_index}.mlp"
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [size, size], cfg.mlp_bias, dtype, parallel,
            linear_method(quant, f"{prefix}.gate_proj", f"{prefix}.up_proj"),
        )  # fmt: skip
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, cfg.mlp_bias, dtype, parallel,
                                           linear_method(quant, f"{prefix}.down_proj"))  # fmt: skip
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_index: int,
        dtype: torch.dtype,
        max_position: int,
        parallel: ParallelConfig,
        quant: QuantConfig | None = None,
        kv_cache_dtype: str = "auto",
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(
            cfg, layer_index, dtype, max_position, parallel, quant, kv_cache_dtype
        )
        self.mlp = LlamaMLP(cfg, layer_index, dtype, parallel, quant)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``hidden``: the residual stream, updated in place and returned (``rows``: only those rows go on
        past attention, in that order, and come back).

        NOTE: o_proj and down_proj add their product to the stream in their epilogue (cuBLAS beta = 1, or
        the fused GEMV's), so each RMSNorm reads the stream and writes the normed copy: two passes over the
        activations, where a fused add-RMSNorm took four (a 16k-token prefill step of 8B: ~6 ms of 370).
        Each RMSNorm goes to the projection after it, whose weight format may fuse the two; on a CUDA
        decode step of one row it does (FUSED_GEMV_MAX_M): 2 kernels per layer fewer.
        """
        attn = self.self_attn
        qkv, _ = attn.qkv_proj.forward_rmsnorm(hidden, None, self.input_layernorm)
        hidden = attn.attend(positions, qkv, meta, hidden, rows)
        mlp = self.mlp
        gate_up, _ = mlp.gate_up_proj.forward_rmsnorm(hidden, None, self.post_attention_layernorm)
        return mlp.down_proj.forward_silu_mul(gate_up, hidden)  # FP8: silu_and_mul_quant feeds the GEMM


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_position: int, parallel: ParallelConfig,
                 quant: QuantConfig | None = None, kv_cache_dtype: str = "auto") -> None:  # fmt: skip
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, parallel)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, dtype, max_position, parallel, quant, kv_cache_dtype)
            for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        hidden = self.embed_tokens(input_ids)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden = layer(positions, hidden, meta, rows if i == last else None)
        return self.norm(hidden)


class LlamaForCausalLM(nn.Module):
    """Decoder-only causal LM over a paged KV cache."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_position: int,
                 parallel: ParallelConfig = SINGLE_RANK, quant: QuantConfig | None = None,
                 kv_cache_dtype: str = "auto") -> None:  # fmt: skip
        """``quant``: the linear layers' FP8 format (None: dense); ``kv_cache_dtype`` "fp8": the attention
        layers get K/V scales."""
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, dtype, max_position, parallel, quant, kv_cache_dtype)
        # NOTE: with tied embeddings the head reads the embedding table; no second copy exists.
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else ParallelLMHead(cfg.vocab_size, cfg.hidden_size, dtype, parallel)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                rows: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``input_ids``/``positions [T]`` -> final hidden states ``[T, hidden]``; with ``rows`` (indices into
        the T tokens) those rows' only, ``[len(rows), hidden]``.

        NOTE: only the rows whose logits are sampled need the last layer past its attention (every token's
        K/V is written before): a prefill step of many tokens skips that layer's o_proj and MLP for the
        rest, ~2.7% of its GEMM work on the 8B shape (as llama.cpp does).
        """
        return self.model(input_ids, positions, meta, rows)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` -> ``[N, vocab]`` logits in the model's dtype."""
        head = self.lm_head
        if head is None:
            return ParallelLMHead.compute_logits(self.model.embed_tokens, hidden)
        return head.compute_logits(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF checkpoint tensors; returns the parameters filled (fused shards as ``name:shard``)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.lm_head is None and name == "lm_head.weight"):
                continue
            kv_scale = _KV_SCALE.fullmatch(name)
            if kv_scale is not None:
                # NOTE: used by an FP8 KV cache only (its attention layers then have these parameters).
                target = f"{kv_scale[1]}.attn.{kv_scale[2] or kv_scale[3]}_scale"
                if target in params:
                    _copy_exact(params[target], tensor.reshape(params[target].shape), target)
                    loaded.add(target)
                continue
            shard_id = None
            for piece, (fused, shard) in _FUSED_SHARDS.items():
                if f".{piece}." in name:
                    name, shard_id = name.replace(f".{piece}.", f".{fused}."), shard
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(
                    f"unexpected weight {name!r} in the checkpoint for {self.config.architecture}"
                )
            owner = self.get_submodule(name.rsplit(".", 1)[0])
            loader = getattr(owner, "weight_loader", None)
            if loader is not None:
                loader(param, tensor, shard_id)
            else:
                _copy_exact(param, tensor, name)
            loaded.add(name if shard_id is None else f"{name}:{shard_id}")
        return loaded

    def expected_weights(self) -> set[str]:
        """Every parameter (and fused shard) that a complete checkpoint fills. An FP8 KV cache's scales are
        optional: calibrated at load when the checkpoint has none (``executor/kv_scales.py``)."""
        names: set[str] = set()
        for name, _ in self.named_parameters():
            if name.endswith((".attn.k_scale", ".attn.v_scale")):
                continue
            if ".qkv_proj." in name:
                names.update(f"{name}:{s}" for s in ("q", "k", "v"))
            elif ".gate_up_proj." in name:
                names.update(f"{name}:{s}" for s in (0, 1))
            else:
                names.add(name)
        return names


def _copy_exact(param: nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(tensor)
