"""The core primitive: "block + extra keys" attention, returning (o, lse).

Every part of HyperAttention reduces to one computation. Queries and keys come grouped
in ``num_blocks`` blocks (in LSH-sorted order, or in original order for the exact local
parts); query block ``β`` attends, in one softmax, to

* its own key block ``β`` (the "diagonal" keys), and
* a set of ``m`` extra keys: either one set shared by all blocks (the uniformly sampled
  columns of the residual estimate, whose logits get the importance weight ``bias``) or
  one set per block (the sink keys and the window's overhang outside the block).

Which (query, key) pairs count is decided from the keys' original positions by
``key_mask``, so no dense mask is ever materialised. The function ``block_attention``
below is the pure-JAX reference; Pallas kernels implement the same signature.

Shapes (``Hq = g * Hk`` for grouped-query attention; query head ``h`` reads key head
``h // g``):

  q          [B, Hq, num_blocks * block_q, dk]
  k          [B, Hk, num_blocks * block_k, dk]
  v          [B, Hk, num_blocks * block_k, dv]
  q_pos      [B, Hq, num_blocks * block_q] int32  original positions of the query rows
  k_pos      [B, Hk, num_blocks * block_k] int32  original positions; < 0 marks padding
  extra_k    [B, Hk, E, m, dk]   E == 1 (shared by all blocks) or E == num_blocks
  extra_v    [B, Hk, E, m, dv]
  extra_pos  [B, Hk, E, m] int32  original positions; < 0 marks an unused slot
  extra_block[B, Hk, E, m] int32  block of each extra key; a query row ignores extra keys
                                  of its own block (they were counted as diagonal keys)
  extra_bias [B] float32          added to every scaled extra logit (log(n / m) for samples)

Returns ``o [B, Hq, num_blocks * block_q, dv]`` in q's dtype and
``lse [B, Hq, num_blocks * block_q]`` float32: the log of the weighted sum of
``exp(scale * q.k)`` over the counted keys (``-inf``, with ``o = 0``, when none counts).

With ``BlockSpec.sequence_major`` q, k, v and o are ``[B, rows, H, d]`` instead (the
public layout, so callers need no head-major copies); everything else keeps its shape.
Implementations that read only the head-major layout take such calls through
``head_major``.

q, and k and v together, may also be ``lsh.SortedRows`` (head-major, not sequence-major):
the sorted rows of the caller's arrays, not copied yet. The Mosaic GPU forward kernel reads
them through the index; the other implementations copy them first (``head_major`` does).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from hyperattention_jax import lsh
from hyperattention_jax.config import check_int

# Key rules: which keys of a set count for a query at position p.
ALL = "all"            # every valid key (subject to the causal mask)
LOCAL = "local"        # only keys in the query's exact set E(p): sinks and window
NONLOCAL = "nonlocal"  # only keys outside E(p)
KEY_RULES = (ALL, LOCAL, NONLOCAL)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static description of one ``block_attention`` call.

  Attributes:
    block_q: query rows per block.
    block_k: keys per block.
    causal: count only keys at positions ``<= p``.
    diagonal_keys: rule (one of ``KEY_RULES``) for the diagonal key block.
    extra_keys: rule for the extra keys.
    sink_size: ``E(p)`` holds positions ``< sink_size`` ...
    window_size: ... and positions ``t`` with ``|p - t| < window_size``.
    sequence_major: q, k, v and the output are ``[B, n, H, d]`` (the public layout)
      instead of ``[B, H, n, d]``; positions, extra keys and lse keep their shapes.
  """

  block_q: int
  block_k: int
  causal: bool = False
  diagonal_keys: str = ALL
  extra_keys: str = ALL
  sink_size: int = 0
  window_size: int = 0
  sequence_major: bool = False

  def __post_init__(self):
    check_int("block_q", self.block_q, 1)
    check_int("block_k", self.block_k, 1)
    check_int("sink_size", self.sink_size, 0)
    check_int("window_size", self.window_size, 0)
    for name in ("diagonal_keys", "extra_keys"):
      if getattr(self, name) not in KEY_RULES:
        raise ValueError(f"{name}={getattr(self, name)!r} must be one of {KEY_RULES}.")


def key_mask(q_pos, k_pos, rule: str, spec: BlockSpec):
  """Whether key position ``k_pos`` counts for query position ``q_pos`` (broadcasting).

  Written with elementwise jnp ops only, so kernels evaluate the same rule on tiles.
  """
  keep = k_pos >= 0
  if spec.causal:
    keep = keep & (k_pos <= q_pos)
  if rule == ALL:
    return keep
  distance = jnp.abs(q_pos - k_pos)
  if rule == LOCAL:
    local = k_pos < spec.sink_size
    if spec.window_size > 0:
      local = local | (distance < spec.window_size)
    return keep & local
  # The complement written with comparisons rather than a boolean negation, which Mosaic
  # GPU cannot lower for this expression.
  outside = k_pos >= spec.sink_size
  if spec.window_size > 0:
    outside = outside & (distance >= spec.window_size)
  return keep & outside


def masked_softmax(logits, keep):
  """Probabilities and log-sum-exp over the last axis, counting only ``keep``.

  Rows with nothing kept get probabilities 0 and lse ``-inf``; gradients stay finite.
  """
  logits = jnp.where(keep, logits, -jnp.inf)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  unnormalised = jnp.exp(logits - row_max)
  total = jnp.sum(unnormalised, axis=-1, keepdims=True)
  nonempty = total > 0
  safe_total = jnp.where(nonempty, total, 1.0)
  probs = unnormalised / safe_total
  lse = jnp.where(nonempty, row_max + jnp.log(safe_total), -jnp.inf)
  return probs, lse[..., 0]


def head_major(block_attention_fn):
  """Lets a ``block_attention`` implementation that reads ``[B, H, n, d]`` take
  ``spec.sequence_major`` calls too, by transposing q, k, v in and the output back, and
  rows given as ``lsh.SortedRows``, by copying them into sorted order."""

  @functools.wraps(block_attention_fn)
  def wrapped(q, k, v, *args, spec: BlockSpec, **kwargs):
    # Rows not copied yet (lsh.SortedRows): these implementations need the copies.
    q, k, v = (lsh.dense(x) for x in (q, k, v))
    if not spec.sequence_major:
      return block_attention_fn(q, k, v, *args, spec=spec, **kwargs)
    swap = lambda x: jnp.swapaxes(x, 1, 2)
    out, lse = block_attention_fn(swap(q), swap(k), swap(v), *args,
                                  spec=dataclasses.replace(spec, sequence_major=False), **kwargs)
    return swap(out), lse

  return wrapped


@head_major
def block_attention(q, k, v, q_pos, k_pos, extra_k, extra_v, extra_pos, extra_block,
                    extra_bias, *, spec: BlockSpec, scale):
  """Pure-JAX reference of the core primitive (see the module docstring)."""
  batch, q_heads, q_len, dk = q.shape
  kv_heads, dv = v.shape[1], v.shape[-1]
  groups = q_heads // kv_heads
  num_blocks = q_len // spec.block_q
  num_extra_sets, num_extra = extra_pos.shape[2], extra_pos.shape[3]
  f32 = jnp.float32
  hi = jax.lax.Precision.HIGHEST

  qb = q.reshape(batch, kv_heads, groups, num_blocks, spec.block_q, dk)
  kb = k.reshape(batch, kv_heads, num_blocks, spec.block_k, dk)
  vb = v.reshape(batch, kv_heads, num_blocks, spec.block_k, dv)
  row_pos = q_pos.reshape(batch, kv_heads, groups, num_blocks, spec.block_q, 1)
  key_pos = k_pos.reshape(batch, kv_heads, 1, num_blocks, 1, spec.block_k)

  logits = [scale * jnp.einsum("bhgnqd,bhnkd->bhgnqk", qb, kb, precision=hi,
                               preferred_element_type=f32)]
  keep = [key_mask(row_pos, key_pos, spec.diagonal_keys, spec)]
  if num_extra > 0:
    if num_extra_sets == 1:  # one set shared by every block: no per-block copies
      extra_logits = jnp.einsum("bhgnqd,bhmd->bhgnqm", qb, extra_k[:, :, 0], precision=hi,
                                preferred_element_type=f32)
    else:
      extra_logits = jnp.einsum("bhgnqd,bhnmd->bhgnqm", qb, extra_k, precision=hi,
                                preferred_element_type=f32)
    bias = extra_bias.astype(f32).reshape(batch, 1, 1, 1, 1, 1)
    logits.append(scale * extra_logits + bias)
    shape = (batch, kv_heads, 1, num_extra_sets, 1, num_extra)
    row_block = jnp.arange(num_blocks, dtype=jnp.int32).reshape(1, 1, 1, num_blocks, 1, 1)
    keep.append(key_mask(row_pos, extra_pos.reshape(shape), spec.extra_keys, spec)
                & (extra_block.reshape(shape) != row_block))
  keep = jnp.concatenate([jnp.broadcast_to(m, l.shape) for m, l in zip(keep, logits)], axis=-1)
  probs, lse = masked_softmax(jnp.concatenate(logits, axis=-1), keep)

  out = jnp.einsum("bhgnqk,bhnkd->bhgnqd", probs[..., :spec.block_k], vb.astype(f32),
                   precision=hi)
  if num_extra > 0:
    extra_probs = probs[..., spec.block_k:]
    if num_extra_sets == 1:
      out += jnp.einsum("bhgnqm,bhmd->bhgnqd", extra_probs, extra_v[:, :, 0].astype(f32),
                        precision=hi)
    else:
      out += jnp.einsum("bhgnqm,bhnmd->bhgnqd", extra_probs, extra_v.astype(f32), precision=hi)
  out = out.reshape(batch, q_heads, q_len, dv).astype(q.dtype)
  return out, lse.reshape(batch, q_heads, q_len)
