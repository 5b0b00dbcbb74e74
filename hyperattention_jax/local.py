"""The exact local part: sinks and window, and the exact causal leaves.

For a query at position p the exact set is ``E(p) = {t < sink_size} ∪ {|p - t| <
window_size}``. Rows stay in original order and are grouped in blocks; each block
attends to its own key block plus a per-block set of extra keys: the sink keys outside
the block and the window's overhang on either side of it (only the left side when
causal). Positions outside the set's reach are marked unused, so every key counts once.

The same layout computes the leaves of the causal recursion: a leaf is a block with
every key (causally) counted, and its extra keys are the sinks and the window's overhang
into the previous leaf.
"""

import functools

import jax
import jax.numpy as jnp

from hyperattention_jax import core
from hyperattention_jax.lsh_attention import blocking
from hyperattention_jax.util import pad_axis


def extra_positions(num_blocks: int, block_k: int, kv_len: int, *, sink_size: int,
                    window_size: int, causal: bool):
  """``[num_blocks, m]`` key indices outside each block that may lie in ``E(p)``; -1 unused."""
  starts = (jnp.arange(num_blocks, dtype=jnp.int32) * block_k)[:, None]
  sinks = jnp.broadcast_to(jnp.arange(sink_size, dtype=jnp.int32), (num_blocks, sink_size))
  outside = (sinks < starts) | (sinks >= starts + block_k)
  sinks = jnp.where(outside & (sinks < kv_len), sinks, -1)
  reach = jnp.arange(max(window_size - 1, 0), dtype=jnp.int32)
  sides = [starts - reach[::-1] - 1]             # the window's overhang before the block
  if not causal:
    sides.append(starts + block_k + reach)       # ... and after it
  overhang = jnp.concatenate(sides, axis=1)
  # Overhang keys that are sinks already appear among the sinks.
  overhang = jnp.where((overhang >= sink_size) & (overhang < kv_len), overhang, -1)
  return jnp.concatenate([sinks, overhang], axis=1)


@jax.named_scope("exact_local")
def local_attention(query, key, value, q_pos, k_pos, *, block_size: int, causal: bool,
                    sink_size: int, window_size: int, scale, block_attention):
  """Exact attention over ``E(p)`` (non-causal), or exact causal leaves plus ``E(p)``.

  Args:
    query: ``[B, nq, Hq, dk]``; key: ``[B, nk, Hk, dk]``; value: ``[B, nk, Hk, dv]``,
      sequence-major (the public layout), rows in original order.
    q_pos: ``[B, Hq, nq]``; k_pos: ``[B, Hk, nk]`` (negative marks padding).
    block_size: rows per block (the leaf length when causal).
    causal: leaves: every earlier key of the block counts, plus ``E(p)`` outside it.
      Otherwise only keys in ``E(p)`` count.
    sink_size, window_size: define ``E(p)``.
    scale: logit scale.
    block_attention: the core primitive implementation.

  Returns:
    ``o [B, nq, Hq, dv]`` and ``lse [B, Hq, nq]``.
  """
  batch, kv_len, kv_heads, _ = key.shape
  q_len = query.shape[1]
  nb, bq, bk = blocking(q_len, kv_len, block_size)
  idx = extra_positions(nb, bk, kv_len, sink_size=sink_size, window_size=window_size,
                        causal=causal)
  num_extra = idx.shape[1]
  flat = jnp.maximum(idx, 0).reshape(-1)
  shape = (batch, kv_heads, nb, num_extra)
  extra_k, extra_v = (jnp.moveaxis(jnp.take(x, flat, axis=1), 1, 2).reshape(shape + x.shape[-1:])
                      for x in (key, value))
  extra_pos = jnp.where(idx >= 0, jnp.take(k_pos, flat, axis=2).reshape(shape), -1)
  extra_block = jnp.full(extra_pos.shape, -1, jnp.int32)

  spec = core.BlockSpec(block_q=bq, block_k=bk, causal=causal,
                        diagonal_keys=core.ALL if causal else core.LOCAL,
                        extra_keys=core.LOCAL, sink_size=sink_size, window_size=window_size,
                        sequence_major=True)
  out, lse = block_attention(
      pad_axis(query, nb * bq, 1), pad_axis(key, nb * bk, 1), pad_axis(value, nb * bk, 1),
      pad_axis(q_pos, nb * bq, 2, value=-1), pad_axis(k_pos, nb * bk, 2, value=-1),
      extra_k, extra_v, extra_pos, extra_block, jnp.zeros((batch,), jnp.float32),
      spec=spec, scale=scale)
  return out[:, :q_len], lse[:, :, :q_len]


@jax.named_scope("exact_local")
def sink_attention(query, key, value, k_pos, *, sink_size: int, scale):
  """Exact attention over the first ``sink_size`` keys, in the sequence-major layout.

  Without a window, ``E(p)`` of a non-causal piece is the same few sink keys for every
  query, so this dense form (one pass over the queries) replaces the blocked layout.

  Args:
    query: ``[B, nq, Hq, dk]``; key: ``[B, nk, Hk, dk]``; value: ``[B, nk, Hk, dv]``.
    k_pos: ``[B, Hk, nk]`` key positions (negative marks padding).
    sink_size: the sink keys.
    scale: logit scale.

  Returns:
    ``o [B, nq, Hq, dv]`` float32 and ``lse [B, nq, Hq]`` float32.
  """
  batch, q_len, q_heads, dk = query.shape
  kv_heads = key.shape[2]
  sinks = min(sink_size, key.shape[1])
  hi = jax.lax.Precision.HIGHEST
  grouped = query.reshape(batch, q_len, kv_heads, q_heads // kv_heads, dk)
  logits = scale * jnp.einsum("bnhgd,bshd->bnhgs", grouped, key[:, :sinks], precision=hi,
                              preferred_element_type=jnp.float32)
  probs, lse = core.masked_softmax(logits, k_pos[:, None, :, None, :sinks] >= 0)
  # A sum over the few sinks written elementwise rather than as a dot: XLA fuses it into the
  # merge that consumes it, so this float32 output is never stored.
  sink_values = value[:, :sinks].astype(jnp.float32)
  out = functools.reduce(jnp.add, [probs[..., t, None] * sink_values[:, None, t, :, None, :]
                                   for t in range(sinks)])
  return out.reshape(batch, q_len, q_heads, -1), lse.reshape(batch, q_len, q_heads)
