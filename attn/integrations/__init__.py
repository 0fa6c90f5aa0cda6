"""Adapters that bring attn to the libraries users already run: ``attn.integrations.transformers`` (a Hugging Face
transformers attention backend, model patches and a paged cache for ``generate``) and ``attn.integrations.serve``
(continuous batching of a transformers model on `attn.InflightBatch`).

Nothing here is imported by ``import attn``: transformers is an optional dependency.
"""
