"""Attention across GPUs over ``torch.distributed``: context parallelism (ring attention for prefill, a sharded
KV cache for decode) and tensor-parallel helpers. See lesson 16."""

from . import cost_model, tensor_parallel
from .decode import ShardedKVCache, all_gather_merge, sharded_decode
from .merge import merge_into, merge_stack
from .ring import RingSchedule, attend_step, plan_calls, plan_pieces, ring_attention
from .sharding import Segment, ShardPlan, contiguous_plan, zigzag_plan

__all__ = [
    "ShardedKVCache",
    "all_gather_merge",
    "sharded_decode",
    "tensor_parallel",
    "cost_model",
    "RingSchedule",
    "Segment",
    "ShardPlan",
    "attend_step",
    "contiguous_plan",
    "merge_into",
    "merge_stack",
    "plan_calls",
    "plan_pieces",
    "ring_attention",
    "zigzag_plan",
]
