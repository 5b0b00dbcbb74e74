"""Random inputs of the core primitive, for checking every kernel backend against the reference.

Shared by the tests and by the backends' self-checks on real hardware.
"""

import jax.numpy as jnp
import numpy as np


def random_inputs(seed, *, batch, q_heads, kv_heads, num_blocks, block_q, block_k, dk, dv,
                  num_extra, per_block, dtype, causal=False, sinks=False, sequence_major=False):
  """Random arguments of the core primitive (none zero), laid out as the callers build them.

  Non-causal calls get shuffled positions (LSH-sorted rows) and some padding keys; causal
  leaves and ``sinks`` calls get rows in order, causal leaves with the last query rows and
  keys padded (position -1), as the causal recursion pads them. Extra keys: with ``sinks``,
  each block's set holds the first positions (unused where they lie in the block itself);
  for causal leaves, sinks and positions shortly before the block; otherwise random
  positions. Shared extra sets carry random blocks; per-block sets never lie in their own
  block. With ``sequence_major`` q, k and v are ``[B, n, H, d]`` (``BlockSpec.sequence_major``).
  """
  rng = np.random.default_rng(seed)
  nq, nk = num_blocks * block_q, num_blocks * block_k
  sets = num_blocks if per_block else 1
  if causal or sinks:  # rows in original order
    q_pos = np.broadcast_to(np.arange(nq), (batch, q_heads, nq)).copy()
    k_pos = np.broadcast_to(np.arange(nk), (batch, kv_heads, nk)).copy()
    if causal:  # the last rows are padding, as the causal recursion pads them
      q_pos[..., nq - 5:] = -1
      k_pos[..., nk - 7:] = -1
  else:
    q_pos = np.stack([[rng.permutation(nq) for _ in range(q_heads)] for _ in range(batch)])
    k_pos = np.stack([[rng.permutation(nk) for _ in range(kv_heads)] for _ in range(batch)])
    k_pos = np.where(rng.random(k_pos.shape) < 0.15, -1, k_pos)
  if sinks:  # block b's extra set: the sinks, unused where they lie in block b itself
    starts = np.arange(sets)[:, None] * block_k
    extra_pos = np.broadcast_to(np.arange(num_extra), (sets, num_extra))
    extra_pos = np.where(extra_pos >= starts, -1, extra_pos)
    extra_pos = np.broadcast_to(extra_pos, (batch, kv_heads, sets, num_extra))
  elif causal:  # sinks and positions shortly before the block
    starts = np.arange(sets)[:, None] * block_k
    extra_pos = starts - rng.integers(1, 3 * num_extra, size=(batch, kv_heads, sets, num_extra))
    extra_pos = np.where(extra_pos < 0, rng.integers(0, 2, size=extra_pos.shape), extra_pos)
  else:
    extra_pos = rng.integers(-1, nk, size=(batch, kv_heads, sets, num_extra))
  if per_block:
    extra_block = np.full(extra_pos.shape, -1)
  else:
    extra_block = rng.integers(0, num_blocks, size=extra_pos.shape)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  rows = (lambda x: jnp.swapaxes(x, 1, 2)) if sequence_major else (lambda x: x)
  return dict(
      q=rows(normal(batch, q_heads, nq, dk)), k=rows(normal(batch, kv_heads, nk, dk)),
      v=rows(normal(batch, kv_heads, nk, dv)), q_pos=jnp.asarray(q_pos, jnp.int32),
      k_pos=jnp.asarray(k_pos, jnp.int32), extra_k=normal(batch, kv_heads, sets, num_extra, dk),
      extra_v=normal(batch, kv_heads, sets, num_extra, dv),
      extra_pos=jnp.asarray(extra_pos, jnp.int32),
      extra_block=jnp.asarray(extra_block, jnp.int32),
      extra_bias=jnp.asarray(rng.normal(size=(batch,)) + 1.0, jnp.float32))
