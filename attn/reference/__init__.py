"""Readable PyTorch definitions of every operation: what "correct" means for the kernels in ``attn.fast``."""

from .attention import attention, attention_mask, attention_unfused

__all__ = ["attention", "attention_mask", "attention_unfused"]
