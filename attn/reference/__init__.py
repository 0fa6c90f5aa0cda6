"""Readable PyTorch definitions of every operation: what "correct" means for the kernels in ``attn.fast``."""

from ..options import accepts_options
from .alibi import alibi_slopes
from .attention import alibi_bias, attention, attention_mask, attention_unfused
from .beam import update_indirection
from .context import context_attention
from .cross import cross_attention
from .decode import decode, gather_kv
from .fp8_attention import attention_fp8
from .gpt_attention import gpt_attention
from .kv_cache import append_kv, slot_of, window_tokens
from .kv_quant import calibrate_kv_scales, dequantize, quantize
from .preprocess import RopeScaling, apply_rope, cache_positions, preprocess, rope_cos_sin, rope_inv_freq
from .relative_bias import RelativeBias, relative_bias_matrix, t5_bucket

# each entry also takes its options as values (scores=, cache_view=, rope=; attn/options.py), as attn.fast's do
append_kv, attention, attention_unfused, context_attention, cross_attention, decode, gpt_attention, preprocess = (
    accepts_options(f) for f in (append_kv, attention, attention_unfused, context_attention, cross_attention, decode,
                                 gpt_attention, preprocess)
)  # fmt: skip

__all__ = [
    "RelativeBias",
    "RopeScaling",
    "alibi_bias",
    "alibi_slopes",
    "append_kv",
    "apply_rope",
    "attention",
    "attention_fp8",
    "attention_mask",
    "attention_unfused",
    "cache_positions",
    "calibrate_kv_scales",
    "context_attention",
    "cross_attention",
    "dequantize",
    "decode",
    "gather_kv",
    "gpt_attention",
    "preprocess",
    "quantize",
    "relative_bias_matrix",
    "rope_cos_sin",
    "rope_inv_freq",
    "slot_of",
    "t5_bucket",
    "update_indirection",
    "window_tokens",
]
