"""Angular LSH (SortLSH): hash rows, sort them, and undo the sort.

Arrays here carry the sequence on axis -2 (rows) and features on axis -1; any leading
axes (batch, heads) are batched over. ``RowMap`` and ``permute`` move rows between the
public sequence-major layout ``[B, n, H, d]`` and the sorted head-major one without
transposing whole arrays first.
"""

import dataclasses
from typing import NamedTuple

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


def padding_key(num_projections: int) -> int:
  """The sort key of padding rows, ``2**r``: past every bucket rank, so they sort last."""
  return 1 << num_projections


def sort_key(x, projections, is_padding=None):
  """int32 sort key: the bucket rank, or ``padding_key`` for padding rows."""
  rank = bucket_rank(x, projections)
  if is_padding is None:
    return rank
  return jnp.where(is_padding, jnp.int32(padding_key(projections.shape[-1])), rank)


def sort_permutation(keys):
  """Stable argsort of integer keys along the last axis (an int32 permutation)."""
  # lax.sort on (key, iota) with one sort key is a stable argsort in the keys' own dtype.
  with jax.named_scope("lsh_sort"):
    iota = jax.lax.broadcasted_iota(jnp.int32, keys.shape, keys.ndim - 1)
    _, perm = jax.lax.sort((keys, iota), dimension=keys.ndim - 1,
                           is_stable=True, num_keys=1)
    return perm


def gather(x, perm):
  """``x[..., perm]`` for ``x [..., n]`` and ``perm [..., n']``."""
  return jnp.take_along_axis(x, perm, axis=-1, mode="clip")


def invert_permutation(perm):
  """The inverse of a permutation along the last axis: ``inv[perm[i]] = i``."""
  n = perm.shape[-1]
  iota = jnp.broadcast_to(jnp.arange(n, dtype=perm.dtype), perm.shape)
  return jnp.put_along_axis(jnp.zeros_like(perm), perm, iota, axis=-1, inplace=False)


class RowMap(NamedTuple):
  """A one-to-one map between rows of a sequence-major array and sorted rows.

  The source is ``[B, n, H, d]`` seen as ``B * n * H`` rows of ``d``; the sorted array is
  ``[B, G, H, m, d]`` (``G`` groups of ``m`` sorted rows per batch row and head) seen as
  ``M = B * G * H * m`` rows. Rows that the map leaves out point past the end (index
  ``M`` or ``B * n * H``) and read as zeros.

  Attributes:
    to_sorted: ``[M]`` source row of each sorted row.
    from_sorted: ``[B * n * H]`` sorted row of each source row.
  """

  to_sorted: jnp.ndarray
  from_sorted: jnp.ndarray


def row_map(perm, offsets, source_len: int) -> RowMap:
  """The ``RowMap`` that sorts group ``g`` of each head's rows by ``perm``.

  Args:
    perm: ``[B, G, H, m]`` permutations of ``0..m-1``.
    offsets: ``[G]`` first source row of each group (group ``g`` holds source rows
      ``offsets[g] .. offsets[g] + m - 1``; those at or past ``source_len`` are padding).
    source_len: ``n``, the rows of the source per batch row.
  """
  batch, _, heads, _ = perm.shape
  rows = jnp.asarray(offsets, jnp.int32)[None, :, None, None] + perm
  batch_ids = jnp.arange(batch, dtype=jnp.int32)[:, None, None, None]
  head_ids = jnp.arange(heads, dtype=jnp.int32)[None, None, :, None]
  num_source = batch * source_len * heads
  to_sorted = jnp.where(rows < source_len, (batch_ids * source_len + rows) * heads + head_ids,
                        num_source).reshape(-1)
  num_sorted = to_sorted.shape[0]
  from_sorted = jnp.full((num_source + 1,), num_sorted, jnp.int32).at[to_sorted].set(
      jnp.arange(num_sorted, dtype=jnp.int32), unique_indices=True)[:num_source]
  return RowMap(to_sorted, from_sorted)


def take_rows(x, idx, fill_value=0):
  """``x[idx]`` along axis 0; indices out of range read ``fill_value``."""
  return jnp.take(x, idx, axis=0, mode="fill", fill_value=fill_value)


@jax.custom_vjp
def permute(x, idx, inverse_idx):
  """``x[idx]`` for rows ``x [R, d]`` and a one-to-one ``idx`` (out-of-range reads 0).

  ``inverse_idx`` is the inverse map, so the gradient is a gather too (no scatter-add):
  ``permute(x, m.to_sorted, m.from_sorted)`` sorts rows, and
  ``permute(y, m.from_sorted, m.to_sorted)`` puts them back.
  """
  del inverse_idx
  return take_rows(x, idx)


def _permute_fwd(x, idx, inverse_idx):
  return take_rows(x, idx), inverse_idx


def _permute_bwd(inverse_idx, d_out):
  # inverse_idx has one entry per row of x, so this has x's shape.
  return take_rows(d_out, inverse_idx), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SortedRows:
  """Rows of an array in another order, not copied yet: ``source[rows]`` as ``[B, H, n, d]``.

  The core primitive may take its queries, keys and values this way (``core.block_attention``):
  a kernel that reads rows through an index skips the sorted copy, the others call
  ``materialize``.

  Attributes:
    source: ``[R, d]`` rows (a sequence-major ``[B, n_all, H, d]`` array seen as rows).
    rows: ``[B, H, n]`` int32, the source row of each sorted row; ``R`` or more: a zero row.
    inverse: ``[R]`` int32, the position in ``rows.reshape(-1)`` of each source row;
      ``rows.size`` or more for rows that are not taken (one-to-one otherwise).
  """

  source: jax.Array
  rows: jax.Array
  inverse: jax.Array

  @property
  def shape(self):
    return (*self.rows.shape, self.source.shape[-1])

  @property
  def dtype(self):
    return self.source.dtype

  def materialize(self):
    """The sorted array ``[B, H, n, d]`` (its gradient is a gather too)."""
    flat = permute(self.source, self.rows.reshape(-1), self.inverse)
    return flat.reshape(self.shape)

  def pad(self, length: int) -> "SortedRows":
    """The same rows with zero rows appended on the rows axis up to ``length``."""
    batch, heads, n = self.rows.shape
    if length == n:
      return self
    rows = jnp.pad(self.rows, ((0, 0), (0, 0), (0, length - n)),
                   constant_values=self.source.shape[0])
    taken = self.inverse < batch * heads * n
    inverse = jnp.where(taken, self.inverse // n * length + self.inverse % n,
                        batch * heads * length)
    return SortedRows(self.source, rows, inverse.astype(jnp.int32))


def dense(x):
  """``x`` itself, or for ``SortedRows`` the sorted copy (``SortedRows.materialize``)."""
  return x.materialize() if isinstance(x, SortedRows) else x


def key_dtype(num_projections: int):
  """The narrowest unsigned dtype that holds every sort key (``0 .. 2**r``): a radix sort
  of 8-bit keys makes one pass over them, of 32-bit keys four."""
  if num_projections < 8:
    return jnp.uint8
  return jnp.uint16 if num_projections < 16 else jnp.uint32


def head_sort_key(x, projections, is_padding=None):
  """``sort_key`` of sequence-major rows ``x [B, n, H, d]``: ``[B, H, n]`` in ``key_dtype``."""
  with jax.named_scope("lsh_hash"):
    padding = None if is_padding is None else jnp.swapaxes(is_padding, 1, 2)
    key = jnp.swapaxes(sort_key(x, projections, padding), 1, 2)
    return key.astype(key_dtype(projections.shape[-1]))
