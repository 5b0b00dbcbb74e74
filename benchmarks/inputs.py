"""Random inputs of the core primitive at real shapes, drawn on the device."""

import jax
import jax.numpy as jnp
import numpy as np


def normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def lsh_inputs(seed, *, batch=1, q_heads, kv_heads, num_blocks, block_q, block_k, dk, dv,
               num_extra, dtype):
  """Arguments of an LSH piece: shuffled positions, padding keys, one shared sample set."""
  keys = jax.random.split(jax.random.key(seed), 10)
  nq, nk = num_blocks * block_q, num_blocks * block_k
  q_pos = jax.vmap(lambda k: jax.random.permutation(k, nq))(
      jax.random.split(keys[0], batch * q_heads)).reshape(batch, q_heads, nq)
  k_pos = jax.vmap(lambda k: jax.random.permutation(k, nk))(
      jax.random.split(keys[1], batch * kv_heads)).reshape(batch, kv_heads, nk)
  k_pos = jnp.where(jax.random.uniform(keys[2], k_pos.shape) < 0.05, -1, k_pos)
  sample = jax.random.randint(keys[3], (batch, kv_heads, 1, num_extra), 0, nk)
  return dict(
      q=normal(keys[4], (batch, q_heads, nq, dk), dtype),
      k=normal(keys[5], (batch, kv_heads, nk, dk), dtype),
      v=normal(keys[6], (batch, kv_heads, nk, dv), dtype),
      q_pos=q_pos.astype(jnp.int32), k_pos=k_pos.astype(jnp.int32),
      extra_k=normal(keys[7], (batch, kv_heads, 1, num_extra, dk), dtype),
      extra_v=normal(keys[8], (batch, kv_heads, 1, num_extra, dv), dtype),
      extra_pos=sample.astype(jnp.int32), extra_block=(sample // block_k).astype(jnp.int32),
      extra_bias=jnp.full((batch,), np.log(nk / num_extra), jnp.float32))


def leaf_inputs(seed, *, batch=1, heads, num_blocks, block, dim, sinks, dtype):
  """Arguments of the causal leaves: rows in order, each block's sinks as its extra keys."""
  keys = jax.random.split(jax.random.key(seed), 5)
  n = num_blocks * block
  pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, heads, n))
  sink_pos = jnp.broadcast_to(jnp.arange(sinks, dtype=jnp.int32), (num_blocks, sinks))
  sink_pos = jnp.where(jnp.arange(num_blocks)[:, None] > 0, sink_pos, -1)  # block 0 holds them
  extra_pos = jnp.broadcast_to(sink_pos, (batch, heads, num_blocks, sinks))
  return dict(
      q=normal(keys[0], (batch, heads, n, dim), dtype),
      k=normal(keys[1], (batch, heads, n, dim), dtype),
      v=normal(keys[2], (batch, heads, n, dim), dtype),
      q_pos=pos, k_pos=pos,
      extra_k=normal(keys[3], (batch, heads, num_blocks, sinks, dim), dtype),
      extra_v=normal(keys[4], (batch, heads, num_blocks, sinks, dim), dtype),
      extra_pos=extra_pos, extra_block=jnp.full(extra_pos.shape, -1, jnp.int32),
      extra_bias=jnp.zeros((batch,), jnp.float32))
