"""HyperAttention as a ``flax.nnx`` layer."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.nnx.nn.linear import default_kernel_init

from hyperattention_jax import lsh
from hyperattention_jax.api import hyper_attention
from hyperattention_jax.config import HyperAttentionConfig
from hyperattention_jax.flax import adapters

DEFAULT_RNG_COLLECTION = "hyper_attention"


class LSHProjections(nnx.Variable):
  """The LSH hyperplanes of a layer, ``[head_dim, num_projections]``.

  Not an ``nnx.Param``: optimizers built with ``wrt=nnx.Param`` leave them alone, and
  ``nnx.state(model)`` (hence a checkpoint) carries them.
  """


class HyperAttention(nnx.Module):
  """Multi-head attention computed with HyperAttention (``flax.nnx``).

  Configured like ``nnx.MultiHeadAttention`` and with the same parameters (``query``,
  ``key``, ``value``, ``out``), so weights move between the two with ``nnx.update``.
  The LSH hyperplanes are drawn once, at construction, from the ``params`` stream
  (after the weights, which therefore equal those of ``nnx.MultiHeadAttention`` built
  from the same seed), and stored as an ``LSHProjections`` variable.

  The sampled key columns need randomness at each call. It comes from the call's
  ``rngs``, else from the stream named ``rng_collection`` of the ``rngs`` given to the
  constructor (kept, like ``nnx.Dropout`` does, and advanced at every call). When
  neither is there, a fixed key is used and the layer is deterministic: the same inputs
  give the same output.

  Args:
    num_heads: query heads.
    in_features: features of ``inputs_q``.
    qkv_features: query/key/value features over all heads; ``in_features`` when None.
    out_features: output features; ``in_features`` when None.
    num_kv_heads: key/value heads (grouped-query attention); ``num_heads`` when None.
    in_kv_features: features of ``inputs_k`` / ``inputs_v``; ``in_features`` when None.
    is_causal: causal self-attention.
    config: a ``HyperAttentionConfig``; the default one when None.
    implementation: core-primitive implementation, as in ``hyper_attention``.
    dtype: computation dtype of the projections (Flax's convention).
    param_dtype: parameter dtype.
    precision: precision of the projections.
    kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias: as in
      ``nnx.MultiHeadAttention``.
    rng_collection: name of the stream the samples come from.
    check_mask: check traced masks at run time (see ``adapters``).
    rngs: ``nnx.Rngs``; ``params`` (or ``default``) initialises the weights and the
      hyperplanes.

  Example:
    >>> layer = HyperAttention(num_heads=4, in_features=64, is_causal=True,
    ...                        rngs=nnx.Rngs(params=0, hyper_attention=1))
    >>> layer(jnp.ones((2, 8192, 64))).shape
    (2, 8192, 64)
  """

  def __init__(self, num_heads: int, in_features: int, *, qkv_features: int | None = None,
               out_features: int | None = None, num_kv_heads: int | None = None,
               in_kv_features: int | None = None, is_causal: bool = False,
               config: HyperAttentionConfig | None = None, implementation: str | None = None,
               dtype=None, param_dtype=jnp.float32, precision=None,
               kernel_init=default_kernel_init, out_kernel_init=None,
               bias_init=initializers.zeros_init(), out_bias_init=None, use_bias: bool = True,
               rng_collection: str = DEFAULT_RNG_COLLECTION, check_mask: bool = True,
               rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.in_features = in_features
    self.qkv_features = in_features if qkv_features is None else qkv_features
    self.out_features = in_features if out_features is None else out_features
    self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    self.in_kv_features = in_features if in_kv_features is None else in_kv_features
    self.head_dim = adapters.head_dim(self.qkv_features, num_heads, self.num_kv_heads)
    self.is_causal = bool(is_causal)
    self.config = HyperAttentionConfig() if config is None else config
    self.implementation = implementation
    self.rng_collection = rng_collection
    self.check_mask = check_mask

    def linear(in_features, out_features, **kwargs):
      return nnx.LinearGeneral(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                               use_bias=use_bias, precision=precision, rngs=rngs, **kwargs)

    self.query = linear(in_features, (num_heads, self.head_dim), kernel_init=kernel_init,
                        bias_init=bias_init)
    self.key = linear(self.in_kv_features, (self.num_kv_heads, self.head_dim),
                      kernel_init=kernel_init, bias_init=bias_init)
    self.value = linear(self.in_kv_features, (self.num_kv_heads, self.head_dim),
                        kernel_init=kernel_init, bias_init=bias_init)
    self.out = linear((num_heads, self.head_dim), self.out_features, axis=(-2, -1),
                      kernel_init=out_kernel_init or kernel_init,
                      bias_init=out_bias_init or bias_init)
    self.projections = LSHProjections(
        lsh.draw_projections(rngs.params(), self.head_dim, self.config.num_projections))
    # Only a stream given by name counts: nnx.Rngs(0) alone keeps the layer deterministic.
    self.rngs = rngs[rng_collection].fork() if rng_collection in rngs else nnx.data(None)

  def _sample_rng(self, rngs):
    rngs = self.rngs if rngs is None else rngs
    if rngs is None:
      return None
    if isinstance(rngs, nnx.Rngs):
      return rngs[self.rng_collection]() if self.rng_collection in rngs else None
    if isinstance(rngs, nnx.RngStream):
      return rngs()
    return rngs

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
               key_value_seq_lengths=None, is_causal: bool | None = None, rngs=None,
               deterministic: bool | None = None, sow_weights: bool = False,
               decode: bool | None = None):
    """Projects the inputs, attends with HyperAttention, projects back.

    ``inputs_k`` defaults to ``inputs_q`` and ``inputs_v`` to ``inputs_k``.

    Args:
      inputs_q: ``[batch..., q_len, in_features]``.
      inputs_k: ``[batch..., kv_len, in_kv_features]``.
      inputs_v: ``[batch..., kv_len, in_kv_features]``.
      mask: optional bool mask broadcastable to ``[batch..., num_heads, q_len, kv_len]``
        of a supported form (``hyperattention_jax.flax.adapters``); combined with the
        layer's ``is_causal``.
      key_value_seq_lengths: optional ``[batch...]`` ints: keys at positions ``>=`` it
        are padding.
      is_causal: overrides the layer's ``is_causal`` (as ``nnx.MultiHeadAttention``
        takes it at the call).
      rngs: ``nnx.Rngs`` (its ``rng_collection`` stream), an ``nnx.RngStream`` or a
        PRNG key for the samples; overrides the stream kept at construction.
      deterministic: accepted for call sites of ``nnx.MultiHeadAttention``; ignored (the
        layer has no dropout).
      sow_weights: must be False (the weights are never formed).
      decode: must be falsy (no autoregressive cache).

    Returns:
      ``[batch..., q_len, out_features]``.
    """
    del deterministic
    adapters.check_unsupported_call(sow_weights=sow_weights, decode=decode)
    inputs_k, inputs_v = adapters.default_key_value(inputs_q, inputs_k, inputs_v)
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"inputs_q has {inputs_q.shape[-1]} features; the layer expects "
                       f"in_features={self.in_features}.")
    query, key, value = self.query(inputs_q), self.key(inputs_k), self.value(inputs_v)
    rng = self._sample_rng(rngs)
    projections = jax.lax.stop_gradient(self.projections[...])

    attention = functools.partial(hyper_attention, rng=rng, config=self.config,
                                  projections=projections, implementation=self.implementation)
    is_causal = self.is_causal if is_causal is None else bool(is_causal)
    out = adapters.attend(attention, query, key, value, mask=mask, is_causal=is_causal,
                          key_value_seq_lengths=key_value_seq_lengths,
                          check_mask=self.check_mask)
    return self.out(out)
