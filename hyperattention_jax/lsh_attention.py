"""One non-causal HyperAttention piece: LSH sort, block + sampled columns, un-sort.

Steps 1-6 of the algorithm: sort queries and keys by their LSH bucket rank, pair sorted
query block β with sorted key block β by rank, add the uniformly sampled key columns
(weighted by ``n_valid / m``, excluded where they fall in the query's own block), run
the core primitive and put rows back in their original order.
"""

from typing import NamedTuple

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
    q: ``[B, Hq, nq, dk]``; k: ``[B, Hk, nk, dk]``.
    k_pos: ``[B, Hk, nk]`` key positions, negative for padding (sorted last).
    q_is_padding: ``[B, Hq, nq]`` bool, or None: query rows to sort last.
    sample_u: ``[B, Hk, m]`` uniforms in [0, 1).
    projections: ``[dk, r]`` LSH hyperplanes.
  """
  return plan_from_sort_keys(lsh.sort_key(q, projections, q_is_padding),
                             lsh.sort_key(k, projections, k_pos < 0), k_pos, sample_u)


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


def lsh_attention(q, k, v, q_pos, k_pos, plan: LshPlan, *, block_size: int, sink_size: int,
                  window_size: int, scale, block_attention):
  """One non-causal piece, approximating attention over the keys outside ``E(p)``.

  Args:
    q: ``[B, Hq, nq, dk]``; k: ``[B, Hk, nk, dk]``; v: ``[B, Hk, nk, dv]``.
    q_pos: ``[B, Hq, nq]`` original query positions.
    k_pos: ``[B, Hk, nk]`` original key positions, negative for padding.
    plan: from ``make_plan``.
    block_size: keys per block.
    sink_size, window_size: the exact set ``E(p)`` that this piece leaves out.
    scale: logit scale.
    block_attention: the core primitive implementation.

  Returns:
    ``o [B, Hq, nq, dv]`` and ``lse [B, Hq, nq]``, rows in original order.
  """
  batch, kv_heads, kv_len, _ = k.shape
  q_len = q.shape[2]
  nb, bq, bk = blocking(q_len, kv_len, block_size)
  num_samples = plan.sample_idx.shape[-1] if nb > 1 else 0  # one block already sees every key

  sorted_q = pad_axis(lsh.gather_rows(q, plan.q_perm), nb * bq, 2)
  sorted_q_pos = pad_axis(lsh.gather(q_pos, plan.q_perm), nb * bq, 2, value=-1)
  sorted_k = pad_axis(lsh.gather_rows(k, plan.k_perm), nb * bk, 2)
  sorted_v = pad_axis(lsh.gather_rows(v, plan.k_perm), nb * bk, 2)
  sorted_k_pos = pad_axis(lsh.gather(k_pos, plan.k_perm), nb * bk, 2, value=-1)

  idx = plan.sample_idx[..., :num_samples]
  extra_k = lsh.gather_rows(sorted_k, idx)[:, :, None]
  extra_v = lsh.gather_rows(sorted_v, idx)[:, :, None]
  has_keys = (plan.num_valid > 0)[..., None]
  extra_pos = jnp.where(has_keys, lsh.gather(sorted_k_pos, idx), -1)[:, :, None]
  extra_block = (idx // bk)[:, :, None]
  extra_bias = sampling.log_weight(plan.num_valid[:, 0], max(num_samples, 1))

  spec = core.BlockSpec(block_q=bq, block_k=bk, diagonal_keys=core.NONLOCAL,
                        extra_keys=core.NONLOCAL, sink_size=sink_size, window_size=window_size)
  out, lse = block_attention(sorted_q, sorted_k, sorted_v, sorted_q_pos, sorted_k_pos, extra_k,
                             extra_v, extra_pos, extra_block, extra_bias, spec=spec, scale=scale)
  unsort = lsh.invert_permutation(plan.q_perm)
  return lsh.gather_rows(out[:, :, :q_len], unsort), lsh.gather(lse[:, :, :q_len], unsort)
