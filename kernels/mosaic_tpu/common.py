"""Tile-level pieces shared by the Mosaic TPU kernels: layouts, masks, the skip test."""

import jax
import jax.numpy as jnp

from hyperattention_jax import core
from hyperattention_jax.kernels.mosaic_tpu.tiling import NUM_LANES

NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T: contract both minor (lane) dims
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b

_NO_KEY = 1 << 30  # marks padding keys in the skip test; exact in float32


def precision_for(dtype):
  """float32 tiles multiply at full precision (the reference's); bfloat16 natively."""
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def matmul(a, b, dims, precision):
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=jnp.float32)


def row(rows_ref):
  """``[1, t]`` from a ``(8, t)`` block of sublane-replicated rows."""
  return rows_ref[:1, :]


def column(rows_ref):
  """``[t, 1]``: row 0 loaded as a vector, then set down the sublanes (a relayout)."""
  return jnp.expand_dims(rows_ref[0], -1)


def lanes(x, width: int):
  """Widens a lane-replicated ``[t, 128]`` array to ``[t, width]``."""
  if width == NUM_LANES:
    return x
  if width % NUM_LANES == 0:
    return jnp.tile(x, (1, width // NUM_LANES))
  return jnp.broadcast_to(x[:, :1], (x.shape[0], width))


def tile_mask(q_pos, k_pos, rule: str, spec: core.BlockSpec, shape):
  """``core.key_mask`` on a tile; positions are a row and a column spanning ``shape``.

  Both are broadcast to the full tile first, so the rule only meets same-shaped int32
  vectors and every boolean is born at its final layout.
  """
  return core.key_mask(jnp.broadcast_to(q_pos, shape), jnp.broadcast_to(k_pos, shape), rule,
                       spec)


def may_count(q_pos_row, k_pos_row, causal: bool):
  """Scalar: False only when no (query, key) pair of the two tiles can count.

  That is when every key is padding or, with the causal mask, when the first valid key
  comes after the last query. Conservative for any positions, so skipping is always
  exact; on causal leaves it skips the tiles above the diagonal. The reductions run in
  float32, the vector unit's native reduction type; rounding is monotone, so a pair
  that counts is never skipped (positions stay far below the sentinel 2**30).
  """
  f32 = jnp.float32
  first_key = jnp.min(jnp.where(k_pos_row >= 0, k_pos_row, _NO_KEY).astype(f32))
  if causal:
    return first_key <= jnp.max(q_pos_row.astype(f32))
  return first_key < float(_NO_KEY)
