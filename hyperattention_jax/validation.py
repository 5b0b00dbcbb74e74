"""Argument checks shared by the public functions, run before tracing anything heavy.

Every error is a ValueError that names the argument and the offending value.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def _shape(x):
  return tuple(np.shape(x))


def check_inputs(query, key, value, *, is_causal, scale, key_value_seq_lengths, window_size=0):
  """Checks query/key/value and the common options; returns the logit scale to use."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if np.ndim(x) != 4:
      raise ValueError(
          f"{name} must have rank 4 [batch, seq, heads, head_dim]; got {name}.shape={_shape(x)}.")
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{name} must have a floating dtype; got {name}.dtype={dtype}.")
  if not jnp.result_type(query) == jnp.result_type(key) == jnp.result_type(value):
    raise ValueError(
        "query, key and value must share one dtype; got "
        f"{jnp.result_type(query)}, {jnp.result_type(key)}, {jnp.result_type(value)}.")
  batch, q_len, num_heads, head_dim = _shape(query)
  k_batch, kv_len, kv_heads, k_dim = _shape(key)
  if k_batch != batch or _shape(value)[0] != batch:
    raise ValueError(f"batch sizes differ: query.shape={_shape(query)}, key.shape={_shape(key)}, "
                     f"value.shape={_shape(value)}.")
  if _shape(value)[1:3] != (kv_len, kv_heads):
    raise ValueError(f"key and value must share seq and heads: key.shape={_shape(key)}, "
                     f"value.shape={_shape(value)}.")
  if k_dim != head_dim:
    raise ValueError(f"query and key head_dim differ: query.shape={_shape(query)}, "
                     f"key.shape={_shape(key)}.")
  if min(q_len, kv_len, num_heads, kv_heads, head_dim, _shape(value)[3]) == 0:
    raise ValueError(f"empty axis: query.shape={_shape(query)}, key.shape={_shape(key)}, "
                     f"value.shape={_shape(value)}.")
  if num_heads % kv_heads:
    raise ValueError(f"query heads must be a multiple of key/value heads; got "
                     f"num_heads={num_heads}, num_kv_heads={kv_heads}.")
  if is_causal and q_len != kv_len:
    raise ValueError(f"is_causal=True needs q_len == kv_len; got q_len={q_len}, kv_len={kv_len}.")
  if window_size and q_len != kv_len:
    raise ValueError(f"window_size={window_size} needs self-attention (q_len == kv_len); "
                     f"got q_len={q_len}, kv_len={kv_len}.")
  if key_value_seq_lengths is not None:
    if _shape(key_value_seq_lengths) != (batch,):
      raise ValueError(f"key_value_seq_lengths must have shape (batch,)=({batch},); got "
                       f"shape {_shape(key_value_seq_lengths)}.")
    if not jnp.issubdtype(jnp.result_type(key_value_seq_lengths), jnp.integer):
      raise ValueError("key_value_seq_lengths must be integers; got dtype "
                       f"{jnp.result_type(key_value_seq_lengths)}.")
    if not isinstance(key_value_seq_lengths, jax.core.Tracer):
      lengths = np.asarray(key_value_seq_lengths)
      if lengths.min() < 0 or lengths.max() > kv_len:
        raise ValueError(f"key_value_seq_lengths must lie in [0, kv_len={kv_len}]; got "
                         f"{lengths.tolist()}.")
  if scale is None:
    return 1.0 / math.sqrt(head_dim)
  if isinstance(scale, (int, float)) and not isinstance(scale, bool):
    if not math.isfinite(scale) or scale <= 0:
      raise ValueError(f"scale={scale!r} must be a positive finite number.")
    return float(scale)
  if np.ndim(scale) != 0:
    raise ValueError(f"scale must be a scalar; got shape {_shape(scale)}.")
  return scale


def check_projections(projections, head_dim: int, num_projections: int):
  """Checks user-given LSH hyperplanes ``[head_dim, num_projections]``."""
  expected = (head_dim, num_projections)
  if _shape(projections) != expected:
    raise ValueError(f"projections must have shape [head_dim, num_projections]={expected}; got "
                     f"projections.shape={_shape(projections)}.")
  if not jnp.issubdtype(jnp.result_type(projections), jnp.floating):
    raise ValueError(
        f"projections must be floating; got projections.dtype={jnp.result_type(projections)}.")


def check_rng(rng):
  """Accepts a typed PRNG key or a raw ``uint32[2]`` key."""
  if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    if rng.ndim != 0:
      raise ValueError(f"rng must be a single PRNG key; got rng.shape={rng.shape}.")
    return rng
  if _shape(rng) == (2,) and jnp.result_type(rng) == jnp.uint32:
    return jax.random.wrap_key_data(rng)
  raise ValueError(f"rng must be a PRNG key (jax.random.key(seed)); got {rng!r}.")
