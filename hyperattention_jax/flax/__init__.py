"""Flax integration: nnx and linen HyperAttention layers and ``attention_fn`` adapters.

* ``hyperattention_jax.flax.nnx.HyperAttention`` and
  ``hyperattention_jax.flax.linen.HyperAttention``: multi-head attention layers configured
  like Flax's ``MultiHeadAttention``, with the LSH hyperplanes stored as a non-trainable
  variable.
* ``hyper_attention_fn`` / ``exact_attention_fn``: ``attention_fn`` hooks for Flax's own
  ``nnx.MultiHeadAttention`` and ``linen.MultiHeadDotProductAttention``.
"""

from hyperattention_jax.flax import linen
from hyperattention_jax.flax import nnx
from hyperattention_jax.flax.adapters import exact_attention_fn, hyper_attention_fn

__all__ = ["exact_attention_fn", "hyper_attention_fn", "linen", "nnx"]
