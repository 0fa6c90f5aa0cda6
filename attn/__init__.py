"""attn: the attention of LLM inference, as a readable PyTorch reference and as fast Triton kernels.

``attn.reference`` defines what is correct; ``attn.fast`` holds the Triton kernels with the same signatures;
the top-level names are the fast ones.
"""

from . import layout, reference
from .fast import attention, attention_unfused, decode

__all__ = ["attention", "attention_unfused", "decode", "layout", "reference", "fast"]
__version__ = "0.1.0"
