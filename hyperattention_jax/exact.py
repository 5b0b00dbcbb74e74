"""Exact attention, memory-efficient: the ground truth and the exact fallback.

The softmax runs online over key chunks inside a scan, one query chunk at a time, with
rematerialisation, so neither the forward nor the backward pass holds an n x n matrix.
"""

import functools

import jax
import jax.numpy as jnp

from hyperattention_jax import core
from hyperattention_jax import validation
from hyperattention_jax.util import cdiv, pad_axis

QUERY_CHUNK = 512
KEY_CHUNK = 512


def exact_attention_bhnd(q, k, v, q_pos, k_pos, *, causal: bool, scale,
                         query_chunk: int = QUERY_CHUNK, key_chunk: int = KEY_CHUNK):
  """Exact attention in the internal ``[batch, heads, seq, dim]`` layout.

  Args:
    q: ``[B, Hq, nq, dk]``; k: ``[B, Hk, nk, dk]``; v: ``[B, Hk, nk, dv]``.
    q_pos: ``[B, Hq, nq]`` int32 query positions (for the causal mask).
    k_pos: ``[B, Hk, nk]`` int32 key positions; negative marks padding.
    causal: count only keys at positions ``<= q_pos``.
    scale: logit scale.

  Returns:
    ``o [B, Hq, nq, dv]`` in q's dtype and ``lse [B, Hq, nq]`` float32.
  """
  batch, q_heads, q_len, dk = q.shape
  kv_heads, kv_len, dv = v.shape[1], v.shape[2], v.shape[3]
  groups = q_heads // kv_heads
  cq, ck = min(query_chunk, q_len), min(key_chunk, kv_len)
  nqc, nkc = cdiv(q_len, cq), cdiv(kv_len, ck)
  spec = core.BlockSpec(block_q=cq, block_k=ck, causal=causal)

  q_chunks = pad_axis(q, nqc * cq, 2).reshape(batch, kv_heads, groups, nqc, cq, dk)
  q_chunks = jnp.moveaxis(q_chunks, 3, 0)
  qpos_chunks = pad_axis(q_pos, nqc * cq, 2).reshape(batch, kv_heads, groups, nqc, cq)
  qpos_chunks = jnp.moveaxis(qpos_chunks, 3, 0)
  k_chunks = jnp.moveaxis(pad_axis(k, nkc * ck, 2).reshape(batch, kv_heads, nkc, ck, dk), 2, 0)
  v_chunks = jnp.moveaxis(pad_axis(v, nkc * ck, 2).reshape(batch, kv_heads, nkc, ck, dv), 2, 0)
  kpos_chunks = pad_axis(k_pos, nkc * ck, 2, value=-1).reshape(batch, kv_heads, nkc, ck)
  kpos_chunks = jnp.moveaxis(kpos_chunks, 2, 0)

  def one_query_chunk(args):
    q_c, qpos_c = args  # [B, Hk, g, cq, dk], [B, Hk, g, cq]

    def one_key_chunk(carry, kv):
      run_max, run_sum, acc = carry
      k_c, v_c, kpos_c = kv
      logits = scale * jnp.einsum("bhgqd,bhkd->bhgqk", q_c, k_c,
                                  precision=jax.lax.Precision.HIGHEST,
                                  preferred_element_type=jnp.float32)
      keep = core.key_mask(qpos_c[..., None], kpos_c[:, :, None, None, :], core.ALL, spec)
      logits = jnp.where(keep, logits, -jnp.inf)
      # The running max only stabilises the exponentials; the result does not depend on it.
      new_max = jax.lax.stop_gradient(jnp.maximum(run_max, jnp.max(logits, axis=-1)))
      safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
      probs = jnp.exp(logits - safe_max[..., None])
      correction = jnp.exp(run_max - safe_max)
      run_sum = run_sum * correction + jnp.sum(probs, axis=-1)
      acc = acc * correction[..., None] + jnp.einsum(
          "bhgqk,bhkd->bhgqd", probs, v_c.astype(jnp.float32),
          precision=jax.lax.Precision.HIGHEST)
      return (new_max, run_sum, acc), None

    init = (jnp.full(q_c.shape[:-1], -jnp.inf, jnp.float32),
            jnp.zeros(q_c.shape[:-1], jnp.float32),
            jnp.zeros(q_c.shape[:-1] + (dv,), jnp.float32))
    (run_max, run_sum, acc), _ = jax.lax.scan(
        jax.checkpoint(one_key_chunk), init, (k_chunks, v_chunks, kpos_chunks))
    nonempty = run_sum > 0
    safe_sum = jnp.where(nonempty, run_sum, 1.0)
    safe_max = jnp.where(jnp.isfinite(run_max), run_max, 0.0)
    lse = jnp.where(nonempty, safe_max + jnp.log(safe_sum), -jnp.inf)
    return acc / safe_sum[..., None], lse

  out, lse = jax.lax.map(jax.checkpoint(one_query_chunk), (q_chunks, qpos_chunks))
  out = jnp.moveaxis(out, 0, 3).reshape(batch, q_heads, nqc * cq, dv)[:, :, :q_len]
  lse = jnp.moveaxis(lse, 0, 3).reshape(batch, q_heads, nqc * cq)[:, :, :q_len]
  return out.astype(q.dtype), lse


def positions(batch: int, heads: int, length: int, valid_lengths=None):
  """``[batch, heads, length]`` int32 positions; those ``>= valid_lengths`` become -1."""
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, heads, length))
  if valid_lengths is None:
    return pos
  valid = pos < jnp.asarray(valid_lengths, jnp.int32)[:, None, None]
  return jnp.where(valid, pos, -1)


@functools.partial(jax.jit, static_argnames=("is_causal", "return_lse"))
def _exact_attention(query, key, value, scale, key_value_seq_lengths, *, is_causal, return_lse):
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  batch = q.shape[0]
  q_pos = positions(batch, q.shape[1], q.shape[2])
  k_pos = positions(batch, k.shape[1], k.shape[2], key_value_seq_lengths)
  out, lse = exact_attention_bhnd(q, k, v, q_pos, k_pos, causal=is_causal, scale=scale)
  out = jnp.swapaxes(out, 1, 2)
  return (out, lse) if return_lse else out


def exact_attention(query, key, value, *, is_causal=False, scale=None,
                    key_value_seq_lengths=None, return_lse=False):
  """Exact softmax attention, memory-efficient (never an n x n matrix).

  Args:
    query: ``[batch, q_len, num_heads, head_dim]``.
    key: ``[batch, kv_len, num_kv_heads, head_dim]``; ``num_heads % num_kv_heads == 0``.
    value: ``[batch, kv_len, num_kv_heads, value_head_dim]``.
    is_causal: mask keys after the query position (needs ``q_len == kv_len``).
    scale: logit scale; ``1 / sqrt(head_dim)`` when None.
    key_value_seq_lengths: optional ``[batch]`` ints; keys at positions ``>=`` the
      length are padding and get no weight.
    return_lse: also return the log-sum-exp ``[batch, num_heads, q_len]`` float32.

  Returns:
    ``[batch, q_len, num_heads, value_head_dim]`` in query's dtype (and lse).

  Example:
    >>> q = k = v = jnp.ones((1, 8, 2, 16))
    >>> exact_attention(q, k, v, is_causal=True).shape
    (1, 8, 2, 16)
  """
  scale = validation.check_inputs(query, key, value, is_causal=is_causal, scale=scale,
                                  key_value_seq_lengths=key_value_seq_lengths)
  return _exact_attention(query, key, value, scale, key_value_seq_lengths,
                          is_causal=is_causal, return_lse=return_lse)
