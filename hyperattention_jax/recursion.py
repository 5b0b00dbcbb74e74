"""Assembling the pieces: non-causal HyperAttention and the causal recursion (step 7).

Causal attention splits the sequence in halves: the lower-left rectangle (second-half
queries, first-half keys) needs no mask and is one non-causal piece; the two diagonal
halves recurse. Flattened, level ``l`` has ``2**(l-1)`` rectangles of equal shape, done
in one batched call, and the leaves (segments of at most ``min_seq_len``) are one
batched exact causal call. Row ``i`` merges ``1 + popcount(i // leaf)`` pieces.
"""

import jax
import jax.numpy as jnp
import numpy as np

from hyperattention_jax import lsh
from hyperattention_jax import sampling
from hyperattention_jax.config import HyperAttentionConfig
from hyperattention_jax.local import local_attention, sink_attention
from hyperattention_jax.lsh_attention import lsh_attention, make_plan, plan_from_sort_keys
from hyperattention_jax.merge import merge_all, merge_partials
from hyperattention_jax.util import cdiv, pad_axis


def recursion_depth(seq_len: int, min_seq_len: int):
  """Levels of the causal recursion and the leaf length (leaves hold ``<= min_seq_len`` rows)."""
  depth = 0
  while cdiv(seq_len, 1 << depth) > min_seq_len:
    depth += 1
  return depth, cdiv(seq_len, 1 << depth)


def _piece_uniforms(rng, batch: int, kv_heads: int, sample_size: int, kv_head_offset=0):
  """``[batch, kv_heads, m]`` uniforms, equal for every batch row."""
  u = sampling.sample_uniforms(rng, kv_heads, sample_size, kv_head_offset)
  return jnp.broadcast_to(u, (batch, kv_heads, sample_size))


def _heads_last(x):
  """``[B, H, n, ...]`` <-> ``[B, n, H, ...]``."""
  return jnp.swapaxes(x, 1, 2)


def noncausal_attention(query, key, value, q_pos, k_pos, q_is_padding, *, sample_rng, projections,
                        config: HyperAttentionConfig, scale, block_attention, kv_head_offset=0):
  """HyperAttention without a causal mask: the LSH piece, merged with the exact local part.

  Args:
    query: ``[B, nq, Hq, dk]``; key: ``[B, nk, Hk, dk]``; value: ``[B, nk, Hk, dv]``
      (sequence-major, as the public API takes them).
    q_pos, k_pos: int32 positions ``[B, H, n]``; negative key positions are padding.
    q_is_padding: ``[B, Hq, nq]`` bool or None: query rows sorted after the others.
    sample_rng: key for the sampled columns.
    projections: ``[dk, r]`` LSH hyperplanes.
    config: the configuration.
    scale: logit scale.
    block_attention: the core primitive implementation.
    kv_head_offset: global index of the first key/value head (non-zero when heads are
      sharded); the samples of a head follow its global index.

  Returns:
    ``o [B, nq, Hq, dv]`` float32 and ``lse [B, Hq, nq]``.
  """
  batch, kv_heads = key.shape[0], key.shape[2]
  u = _piece_uniforms(sample_rng, batch, kv_heads, config.sample_size, kv_head_offset)
  plan = make_plan(query, key, k_pos, q_is_padding, u, projections)
  out, lse = lsh_attention(query, key, value, q_pos, k_pos, plan, q_offsets=[0], k_offsets=[0],
                           block_size=config.block_size, sink_size=config.sink_size,
                           window_size=config.window_size, scale=scale,
                           block_attention=block_attention)
  if not config.has_local:
    return out.astype(jnp.float32), _heads_last(lse)
  if config.window_size == 0:  # the sinks alone: a few keys that every row sees
    local_out, local_lse = sink_attention(query, key, value, k_pos, sink_size=config.sink_size,
                                          scale=scale)
  else:
    local_out, local_lse = local_attention(
        query, key, value, q_pos, k_pos, block_size=max(config.block_size, config.window_size),
        causal=False, sink_size=config.sink_size, window_size=config.window_size, scale=scale,
        block_attention=block_attention)
    local_lse = _heads_last(local_lse)
  out, lse = merge_partials(out, lse, local_out, local_lse)
  return out, _heads_last(lse)


def _rectangles(x, half: int, num_rects: int):
  """``[B, H, 2 * R * h, ...]`` -> ``[B * R, H, h, ...]``: half ``half`` of each pair of segments."""
  batch, heads, length = x.shape[:3]
  h = length // (2 * num_rects)
  x = x.reshape(batch, heads, num_rects, 2, h, *x.shape[3:])[:, :, :, half]
  return jnp.moveaxis(x, 2, 1).reshape(batch * num_rects, heads, h, *x.shape[4:])


def causal_attention(query, key, value, q_pos, k_pos, q_is_padding, *, sample_rng, projections,
                     config: HyperAttentionConfig, scale, block_attention, kv_head_offset=0):
  """Causal HyperAttention by the flattened recursion (arguments as ``noncausal_attention``)."""
  batch, seq_len, kv_heads = key.shape[:3]
  depth, leaf = recursion_depth(seq_len, config.min_seq_len)
  padded = leaf << depth
  q_pos = jnp.broadcast_to(jnp.arange(padded, dtype=jnp.int32), (batch, query.shape[2], padded))
  k_pos = pad_axis(k_pos, padded, 2, value=-1)

  # The leaves: rows in original order, padded to whole leaves.
  out, lse = local_attention(*(pad_axis(x, padded, 1) for x in (query, key, value)), q_pos,
                             k_pos, block_size=leaf, causal=True, sink_size=config.sink_size,
                             window_size=config.window_size, scale=scale,
                             block_attention=block_attention)
  pieces = [(out[:, :seq_len], _heads_last(lse)[:, :seq_len])]
  # Every row is hashed once; each level sorts the keys of its rectangles' rows.
  r = projections.shape[-1]
  padding_key = np.asarray(lsh.padding_key(r), lsh.key_dtype(r))
  q_key = pad_axis(lsh.head_sort_key(query, projections, q_is_padding), padded, 2,
                   value=padding_key)
  k_key = pad_axis(lsh.head_sort_key(key, projections, k_pos[:, :, :seq_len] < 0), padded, 2,
                   value=padding_key)
  for level in range(1, depth + 1):
    num_rects = 1 << (level - 1)
    h = padded // (2 * num_rects)
    level_rng = jax.random.fold_in(sample_rng, level)
    u = jax.vmap(lambda r: sampling.sample_uniforms(
        jax.random.fold_in(level_rng, r), kv_heads, config.sample_size, kv_head_offset))(
            jnp.arange(num_rects))
    u = jnp.broadcast_to(u, (batch,) + u.shape).reshape(batch * num_rects, kv_heads, -1)
    rect_q_pos = _rectangles(q_pos, 1, num_rects)
    rect_k_pos = _rectangles(k_pos, 0, num_rects)
    plan = plan_from_sort_keys(_rectangles(q_key, 1, num_rects), _rectangles(k_key, 0, num_rects),
                               rect_k_pos, u)
    starts = 2 * h * np.arange(num_rects)
    pieces.append(lsh_attention(
        query, key, value, rect_q_pos, rect_k_pos, plan, q_offsets=starts + h, k_offsets=starts,
        block_size=config.block_size, sink_size=config.sink_size,
        window_size=config.window_size, scale=scale, block_attention=block_attention))
  # One merge of all pieces: each is read once and no float32 intermediate is stored.
  out, lse = merge_all(*zip(*pieces))
  return out, _heads_last(lse)
