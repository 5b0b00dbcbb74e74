"""Uniform column sampling for the residual estimate.

Randomness depends on the key and the head index only, never on the batch row, so a
row's result does not depend on the batch it is computed in. Each sample is a uniform
number in [0, 1) that becomes an index among the row's valid keys; rows with different
numbers of valid keys therefore share the draw.
"""

import jax
import jax.numpy as jnp


def sample_uniforms(rng, num_heads: int, sample_size: int, head_offset=0):
  """``[num_heads, sample_size]`` uniforms in [0, 1); head ``h`` uses ``fold_in(rng, h)``.

  ``head_offset`` (an int or a traced int scalar) is the global index of the first head:
  a device that holds heads ``offset..offset+num_heads-1`` of a head-sharded problem draws
  the same numbers as the unsharded call.
  """
  heads = jnp.arange(num_heads, dtype=jnp.uint32) + jnp.asarray(head_offset, jnp.uint32)
  return jax.vmap(lambda h: jax.random.uniform(jax.random.fold_in(rng, h), (sample_size,)))(heads)


def sample_indices(uniforms, num_valid):
  """Indices drawn uniformly with replacement among the first ``num_valid`` rows.

  Args:
    uniforms: ``[..., m]`` numbers in [0, 1).
    num_valid: int array broadcastable to ``uniforms.shape[:-1] + (1,)``.

  Returns:
    int32 indices in ``[0, max(num_valid, 1))``.
  """
  num_valid = jnp.maximum(jnp.asarray(num_valid, jnp.int32), 1)
  idx = jnp.floor(uniforms * num_valid.astype(jnp.float32)).astype(jnp.int32)
  return jnp.minimum(idx, num_valid - 1)


def log_weight(num_valid, sample_size: int):
  """``log(num_valid / sample_size)``: the importance weight of one sampled logit."""
  num_valid = jnp.maximum(jnp.asarray(num_valid, jnp.float32), 1.0)
  return jnp.log(num_valid) - jnp.log(jnp.float32(sample_size))
