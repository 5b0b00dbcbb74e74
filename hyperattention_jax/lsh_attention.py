"""Non-causal HyperAttention pieces: LSH sort, block + sampled columns, un-sort.

Steps 1-6 of the algorithm: sort queries and keys by their LSH bucket rank, pair sorted
query block β with sorted key block β by rank, add the uniformly sampled key columns
(weighted by ``n_valid / m``, excluded where they fall in the query's own block), run
the core primitive and put rows back in their original order.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hyperattention_jax import core
from hyperattention_jax import lsh
from hyperattention_jax import sampling
from hyperattention_jax.util import cdiv, pad_axis


class Blocking(NamedTuple):
  num_blocks: int
  block_q: int
  block_k: int


def blocking(q_len: int, kv_len: int, block_size: int) -> Blocking:
  """Block layout of a piece: the number of blocks follows the keys.

  In self-attention query and key blocks have equal size, so ranks pair one to one;
  in cross-attention the query blocks are scaled to the same number of blocks.
  """
  block_k = min(block_size, kv_len)
  num_blocks = cdiv(kv_len, block_k)
  block_q = block_k if q_len == kv_len else cdiv(q_len, num_blocks)
  return Blocking(num_blocks, block_q, block_k)


class LshPlan(NamedTuple):
  """The random choices of one piece: constants for differentiation.

  Attributes:
    q_perm: ``[B, Hq, nq]`` sorted order of the queries.
    k_perm: ``[B, Hk, nk]`` sorted order of the keys (padding keys last).
    sample_idx: ``[B, Hk, m]`` sampled indices into the *sorted* keys.
    num_valid: ``[B, Hk]`` valid keys of the piece.
  """

  q_perm: jnp.ndarray
  k_perm: jnp.ndarray
  sample_idx: jnp.ndarray
  num_valid: jnp.ndarray


def make_plan(q, k, k_pos, q_is_padding, sample_u, projections) -> LshPlan:
  """Hashes and sorts queries and keys, and turns uniforms into sample indices.

  Args:
    q: ``[B, nq, Hq, dk]``; k: ``[B, nk, Hk, dk]`` (sequence-major).
    k_pos: ``[B, Hk, nk]`` key positions, negative for padding (sorted last).
    q_is_padding: ``[B, Hq, nq]`` bool, or None: query rows to sort last.
    sample_u: ``[B, Hk, m]`` uniforms in [0, 1).
    projections: ``[dk, r]`` LSH hyperplanes.
  """
  return plan_from_sort_keys(lsh.head_sort_key(q, projections, q_is_padding),
                             lsh.head_sort_key(k, projections, k_pos < 0), k_pos, sample_u)


def plan_from_sort_keys(q_key, k_key, k_pos, sample_u) -> LshPlan:
  """``make_plan`` from precomputed sort keys (``lsh.sort_key``, ``[B, H, n]`` int32).

  A row's key depends on the row alone, so the causal recursion hashes every row once
  and cuts the keys of each level's rectangles out of them.
  """
  q_perm = lsh.sort_permutation(q_key)
  k_perm = lsh.sort_permutation(k_key)
  num_valid = jnp.sum(k_pos >= 0, axis=-1, dtype=jnp.int32)
  sample_idx = sampling.sample_indices(sample_u, num_valid[..., None])
  return LshPlan(q_perm, k_perm, sample_idx, num_valid)


def lsh_attention(query, key, value, q_pos, k_pos, plan: LshPlan, *, q_offsets, k_offsets,
                  block_size: int, sink_size: int, window_size: int, scale, block_attention):
  """Non-causal pieces, approximating attention over the keys outside ``E(p)``.

  The piece's rows are ``G`` groups of consecutive rows of the sequence-major inputs
  (one group for the whole sequence; the causal recursion's rectangles otherwise). They
  go to the core primitive in sorted order as ``lsh.SortedRows`` (the inputs' rows and the
  sort index, not copied: a kernel reads them through the index, other implementations copy
  them in sorted order), and the output is put straight back, so no head-major copy of the
  inputs is made.

  Args:
    query: ``[B, nq_all, Hq, dk]``; key: ``[B, nk_all, Hk, dk]``; value:
      ``[B, nk_all, Hk, dv]``, sequence-major as the public API takes them.
    q_pos: ``[B * G, Hq, nq]`` original positions of the piece's query rows.
    k_pos: ``[B * G, Hk, nk]`` original positions of its key rows, negative for padding.
    plan: from ``make_plan`` / ``plan_from_sort_keys`` on ``[B * G, H, n]`` rows.
    q_offsets, k_offsets: ``[G]`` first row of each group in ``query`` / ``key``.
    block_size: keys per block.
    sink_size, window_size: the exact set ``E(p)`` that this piece leaves out.
    scale: logit scale.
    block_attention: the core primitive implementation.

  Returns:
    ``o [B, nq_all, Hq, dv]`` (zero on rows outside the piece) and ``lse [B, nq_all, Hq]``
    (``-inf`` there).
  """
  batch, q_all, q_heads = query.shape[:3]
  kv_all, kv_heads = key.shape[1], key.shape[2]
  groups = len(q_offsets)
  q_len, kv_len = q_pos.shape[2], k_pos.shape[2]
  nb, bq, bk = blocking(q_len, kv_len, block_size)
  num_samples = plan.sample_idx.shape[-1] if nb > 1 else 0  # one block already sees every key

  def grouped(perm):  # [B * G, H, n] -> [B, G, H, n]
    return perm.reshape(batch, groups, *perm.shape[1:])

  with jax.named_scope("lsh_gather"):
    q_map = lsh.row_map(grouped(plan.q_perm), q_offsets, q_all)
    k_map = lsh.row_map(grouped(plan.k_perm), k_offsets, kv_all)

    def to_sorted(x, rows: lsh.RowMap, length, padded):
      return lsh.SortedRows(x.reshape(-1, x.shape[-1]),
                            rows.to_sorted.reshape(batch * groups, x.shape[2], length),
                            rows.from_sorted).pad(padded)

    # The rows go to the primitive uncopied (a kernel may read them through the index).
    sorted_q = to_sorted(query, q_map, q_len, nb * bq)
    sorted_k = to_sorted(key, k_map, kv_len, nb * bk)
    sorted_v = to_sorted(value, k_map, kv_len, nb * bk)
    sorted_q_pos = pad_axis(lsh.gather(q_pos, plan.q_perm), nb * bq, 2, value=-1)
    sorted_k_pos = pad_axis(lsh.gather(k_pos, plan.k_perm), nb * bk, 2, value=-1)

    idx = plan.sample_idx[..., :num_samples]
    sample_rows = jnp.take_along_axis(grouped(k_map.to_sorted.reshape(plan.k_perm.shape)),
                                      grouped(idx), axis=-1)
    extra_k, extra_v = (lsh.take_rows(x.reshape(-1, x.shape[-1]), sample_rows).reshape(
        batch * groups, kv_heads, 1, num_samples, x.shape[-1]) for x in (key, value))
    has_keys = (plan.num_valid > 0)[..., None]
    extra_pos = jnp.where(has_keys, lsh.gather(sorted_k_pos, idx), -1)[:, :, None]
    extra_block = (idx // bk)[:, :, None]
    extra_bias = sampling.log_weight(plan.num_valid[:, 0], max(num_samples, 1))

  spec = core.BlockSpec(block_q=bq, block_k=bk, diagonal_keys=core.NONLOCAL,
                        extra_keys=core.NONLOCAL, sink_size=sink_size, window_size=window_size)
  with jax.named_scope("core_primitive"):
    out, lse = block_attention(sorted_q, sorted_k, sorted_v, sorted_q_pos, sorted_k_pos,
                               extra_k, extra_v, extra_pos, extra_block, extra_bias, spec=spec,
                               scale=scale)
  return _unsort(out, lse, q_map, q_len, (batch, q_all, q_heads))


@jax.named_scope("lsh_unsort")
def _unsort(out, lse, q_map: lsh.RowMap, q_len: int, shape):
  """Sorted ``out [B * G, H, >= q_len, dv]`` and ``lse`` back to the sequence-major rows."""
  dv = out.shape[-1]
  out = lsh.permute(out[:, :, :q_len].reshape(-1, dv), q_map.from_sorted, q_map.to_sorted)
  # lse is small: a plain gather, with -inf on the rows outside the piece.
  lse = lsh.take_rows(lse[:, :, :q_len].reshape(-1), q_map.from_sorted, fill_value=-jnp.inf)
  return out.reshape(*shape, dv), lse.reshape(shape)
