"""attn: the attention of LLM inference, as a readable PyTorch reference and as fast Triton kernels.

``attn.reference`` defines what is correct; ``attn.fast`` holds the Triton kernels with the same signatures;
the top-level names are the fast ones.
"""

from . import distributed, flash_attn_interface, inflight, kv_cache, layout, reference
from .fast import attention_unfused, check_errors, cross_attention, update_indirection
from .inflight import InflightBatch
from .kv_cache import BlockAllocator, ContiguousKVCache, PagedKVCache, PoolExhaustedError

# the fast functions, through attn.ops: direct calls in eager mode, custom operators under torch.compile
from .ops import append_kv, attention, context_attention, decode, gpt_attention, preprocess
from .options import CacheView, RopeOptions, ScoreOptions
from .plan import ContextPlan, DecodePlan, GptAttentionPlan, PrefillPlan
from .reference.alibi import alibi_slopes
from .reference.kv_quant import calibrate_kv_scales
from .reference.preprocess import RopeScaling
from .reference.relative_bias import RelativeBias

__all__ = [
    "BlockAllocator",
    "CacheView",
    "ContextPlan",
    "DecodePlan",
    "GptAttentionPlan",
    "PrefillPlan",
    "InflightBatch",
    "ContiguousKVCache",
    "PagedKVCache",
    "PoolExhaustedError",
    "RelativeBias",
    "RopeOptions",
    "RopeScaling",
    "ScoreOptions",
    "alibi_slopes",
    "append_kv",
    "attention",
    "attention_unfused",
    "calibrate_kv_scales",
    "check_errors",
    "context_attention",
    "cross_attention",
    "decode",
    "distributed",
    "flash_attn_interface",
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
