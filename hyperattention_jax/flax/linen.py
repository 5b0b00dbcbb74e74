"""HyperAttention as a ``flax.linen`` layer."""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.linear import default_kernel_init

from hyperattention_jax import lsh
from hyperattention_jax.api import hyper_attention
from hyperattention_jax.config import HyperAttentionConfig
from hyperattention_jax.flax import adapters

LSH_COLLECTION = "lsh"
DEFAULT_RNG_COLLECTION = "hyper_attention"


class HyperAttention(nn.Module):
  """Multi-head attention computed with HyperAttention (``flax.linen``).

  Configured like ``nn.MultiHeadDotProductAttention`` and with the same parameters
  (``query``, ``key``, ``value``, ``out``), so its ``params`` can be used here as they
  are. The LSH hyperplanes are drawn at ``init`` from the ``params`` rng and stored in the
  ``"lsh"`` collection (``LSH_COLLECTION``): not in ``params``, so an optimizer of the
  params leaves them alone, but part of the variables that ``init`` returns and that a
  checkpoint saves. ``apply`` needs them: pass the whole variables dict.

  The sampled key columns come from the rng stream named ``rng_collection``
  (``apply(..., rngs={"hyper_attention": key})``) or from ``rng`` at the call. Without
  either, a fixed key is used and the layer is deterministic.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); ``num_heads`` when None.
    qkv_features: query/key/value features over all heads; the input features when None.
    out_features: output features; the input features when None.
    is_causal: causal self-attention.
    config: a ``HyperAttentionConfig``; the default one when None.
    implementation: core-primitive implementation, as in ``hyper_attention``.
    dtype: computation dtype of the projections (Flax's convention).
    param_dtype: parameter dtype.
    precision: precision of the projections.
    kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias: as in
      ``nn.MultiHeadDotProductAttention``.
    rng_collection: name of the rng stream the samples come from.
    check_mask: check traced masks at run time (see ``adapters``).

  Example:
    >>> layer = HyperAttention(num_heads=4, is_causal=True)
    >>> x = jnp.ones((2, 8192, 64))
    >>> variables = layer.init(jax.random.key(0), x)  # {"params": ..., "lsh": ...}
    >>> layer.apply(variables, x, rngs={"hyper_attention": jax.random.key(1)}).shape
    (2, 8192, 64)
  """

  num_heads: int
  num_kv_heads: int | None = None
  qkv_features: int | None = None
  out_features: int | None = None
  is_causal: bool = False
  config: HyperAttentionConfig | None = None
  implementation: str | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable = default_kernel_init
  out_kernel_init: Callable | None = None
  bias_init: Callable = nn.initializers.zeros_init()
  out_bias_init: Callable | None = None
  use_bias: bool = True
  rng_collection: str = DEFAULT_RNG_COLLECTION
  check_mask: bool = True

  @nn.compact
  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
               key_value_seq_lengths=None, rng=None, deterministic: bool | None = None,
               dropout_rng=None, sow_weights: bool = False):
    """Projects the inputs, attends with HyperAttention, projects back.

    ``inputs_k`` defaults to ``inputs_q`` and ``inputs_v`` to ``inputs_k``.

    Args:
      inputs_q: ``[batch..., q_len, features]``.
      inputs_k: ``[batch..., kv_len, kv_features]``.
      inputs_v: ``[batch..., kv_len, kv_features]``.
      mask: optional bool mask broadcastable to ``[batch..., num_heads, q_len, kv_len]``
        of a supported form (``hyperattention_jax.flax.adapters``); combined with
        ``is_causal``.
      key_value_seq_lengths: optional ``[batch...]`` ints: keys at positions ``>=`` it
        are padding.
      rng: PRNG key for the samples; overrides the ``rng_collection`` stream.
      deterministic, dropout_rng: accepted for call sites of
        ``nn.MultiHeadDotProductAttention``; ignored (the layer has no dropout).
      sow_weights: must be False (the weights are never formed).

    Returns:
      ``[batch..., q_len, out_features]``.
    """
    del deterministic, dropout_rng
    adapters.check_unsupported_call(sow_weights=sow_weights)
    inputs_k, inputs_v = adapters.default_key_value(inputs_q, inputs_k, inputs_v)
    config = HyperAttentionConfig() if self.config is None else self.config
    num_kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    head_dim = adapters.head_dim(self.qkv_features or inputs_q.shape[-1], self.num_heads,
                                 num_kv_heads)

    def dense(heads, name):
      return nn.DenseGeneral(features=(heads, head_dim), axis=-1, dtype=self.dtype,
                             param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                             bias_init=self.bias_init, use_bias=self.use_bias,
                             precision=self.precision, name=name)

    query = dense(self.num_heads, "query")(inputs_q)
    key = dense(num_kv_heads, "key")(inputs_k)
    value = dense(num_kv_heads, "value")(inputs_v)
    projections = self.variable(
        LSH_COLLECTION, "projections",
        lambda: lsh.draw_projections(self.make_rng("params"), head_dim, config.num_projections))
    if rng is None and self.has_rng(self.rng_collection):
      rng = self.make_rng(self.rng_collection)
    planes = jax.lax.stop_gradient(projections.value)

    attention = functools.partial(hyper_attention, rng=rng, config=config,
                                  projections=planes, implementation=self.implementation)
    out = adapters.attend(attention, query, key, value, mask=mask, is_causal=self.is_causal,
                          key_value_seq_lengths=key_value_seq_lengths,
                          check_mask=self.check_mask)
    return nn.DenseGeneral(features=self.out_features or inputs_q.shape[-1], axis=(-2, -1),
                           dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=self.out_kernel_init or self.kernel_init,
                           bias_init=self.out_bias_init or self.bias_init,
                           use_bias=self.use_bias, precision=self.precision, name="out")(out)
