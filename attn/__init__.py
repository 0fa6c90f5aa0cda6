"""attn: the attention of LLM inference, as a readable PyTorch reference and as fast Triton kernels.

``attn.reference`` defines what is correct; ``attn.fast`` holds the Triton kernels with the same signatures;
the top-level names are the fast ones.
"""

from . import flash_attn_interface as flash_attn_interface
from . import inflight, kv_cache, layout, reference
from .fast import (
    append_kv,
    attention,
    attention_unfused,
    context_attention,
    cross_attention,
    decode,
    gpt_attention,
    preprocess,
    update_indirection,
)
from .inflight import InflightBatch
from .kv_cache import BlockAllocator, ContiguousKVCache, PagedKVCache, PoolExhaustedError
from .reference.alibi import alibi_slopes
from .reference.kv_quant import calibrate_kv_scales
from .reference.preprocess import RopeScaling
from .reference.relative_bias import RelativeBias

__all__ = [
    "BlockAllocator",
    "InflightBatch",
    "ContiguousKVCache",
    "PagedKVCache",
    "PoolExhaustedError",
    "RelativeBias",
    "RopeScaling",
    "alibi_slopes",
    "append_kv",
    "attention",
    "attention_unfused",
    "calibrate_kv_scales",
    "context_attention",
    "cross_attention",
    "decode",
    "fast",
    "gpt_attention",
    "inflight",
    "kv_cache",
    "layout",
    "preprocess",
    "reference",
    "update_indirection",
]
__version__ = "0.1.0"
