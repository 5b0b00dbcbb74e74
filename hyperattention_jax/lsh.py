"""Angular LSH (SortLSH): hash rows, sort them, and undo the sort.

Arrays here carry the sequence on axis -2 (rows) and features on axis -1; any leading
axes (batch, heads) are batched over.
"""

import jax
import jax.numpy as jnp


def draw_projections(rng, head_dim: int, num_projections: int, dtype=jnp.float32):
  """Random hyperplanes for the angular LSH, ``[head_dim, num_projections]``."""
  return jax.random.normal(rng, (head_dim, num_projections), dtype)


def bucket_rank(x, projections):
  """Position of each row's hash bucket in the reflected Gray sequence.

  A row's code is ``sum_t [<x, w_t> > 0] * 2**t``. Ranking codes by their position in
  the reflected Gray sequence (the inverse Gray map) makes buckets adjacent in the
  order differ in one hyperplane; the forward map ``c ^ (c >> 1)`` would not.

  Args:
    x: ``[..., n, d]`` rows.
    projections: ``[d, r]`` hyperplanes.

  Returns:
    ``[..., n]`` int32 ranks in ``[0, 2**r)``.
  """
  r = projections.shape[-1]
  proj = jnp.einsum("...nd,dr->...nr", x.astype(jnp.float32), projections.astype(jnp.float32))
  bits = (proj > 0).astype(jnp.int32)
  # Inverse Gray code: rank bit t is the parity of code bits t..r-1 (most significant first).
  suffix_parity = jnp.cumsum(bits[..., ::-1], axis=-1)[..., ::-1] & 1
  return jnp.sum(suffix_parity << jnp.arange(r, dtype=jnp.int32), axis=-1)


def sort_key(x, projections, is_padding=None):
  """int32 sort key: the bucket rank, or ``2**r`` for padding rows so they sort last."""
  rank = bucket_rank(x, projections)
  if is_padding is None:
    return rank
  return jnp.where(is_padding, jnp.int32(1 << projections.shape[-1]), rank)


def sort_permutation(keys):
  """Stable argsort of int32 keys along the last axis."""
  # lax.sort on (key, iota) with one sort key is a stable argsort that keeps int32 keys.
  iota = jax.lax.broadcasted_iota(jnp.int32, keys.shape, keys.ndim - 1)
  _, perm = jax.lax.sort((keys.astype(jnp.int32), iota), dimension=keys.ndim - 1,
                         is_stable=True, num_keys=1)
  return perm


def gather_rows(x, perm):
  """``x[..., perm, :]`` for ``x [..., n, d]`` and ``perm [..., n']`` (leading axes broadcast)."""
  return jnp.take_along_axis(x, perm[..., None], axis=-2, mode="clip")


def gather(x, perm):
  """``x[..., perm]`` for ``x [..., n]`` and ``perm [..., n']``."""
  return jnp.take_along_axis(x, perm, axis=-1, mode="clip")


def invert_permutation(perm):
  """The inverse of a permutation along the last axis: ``inv[perm[i]] = i``."""
  n = perm.shape[-1]
  iota = jnp.broadcast_to(jnp.arange(n, dtype=perm.dtype), perm.shape)
  return jnp.put_along_axis(jnp.zeros_like(perm), perm, iota, axis=-1, inplace=False)
