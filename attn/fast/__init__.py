"""Triton kernels with the same signatures as ``attn.reference``.

On a machine without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), which executes
each program in numpy: slow, but exact enough to test every kernel on a CPU. The variable must be set before
the kernels are defined, hence here, before the kernel modules are imported. Set it yourself to force either
mode. On a CPU, import ``attn`` before ``triton`` (or export the variable before starting Python): Triton
decides some of its interpreter set-up when it is first imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ..options import accepts_options  # noqa: E402
from ._errors import check_errors  # noqa: E402
from .attention import attention  # noqa: E402
from .beam import update_indirection  # noqa: E402
from .context import context_attention  # noqa: E402
from .cross import cross_attention  # noqa: E402
from .decode import choose_num_splits, decode  # noqa: E402
from .gpt_attention import gpt_attention  # noqa: E402
from .kv_cache import append_kv  # noqa: E402
from .preprocess import preprocess  # noqa: E402
from .unfused import attention_unfused  # noqa: E402

# each entry also takes its options as values (scores=, cache_view=, rope=; attn/options.py)
append_kv, attention, attention_unfused, context_attention, cross_attention, decode, gpt_attention, preprocess = (
    accepts_options(f) for f in (append_kv, attention, attention_unfused, context_attention, cross_attention, decode,
                                 gpt_attention, preprocess)
)  # fmt: skip

__all__ = [
    "append_kv",
    "attention",
    "attention_unfused",
    "check_errors",
    "choose_num_splits",
    "context_attention",
    "cross_attention",
    "decode",
    "gpt_attention",
    "preprocess",
    "update_indirection",
]
