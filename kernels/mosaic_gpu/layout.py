"""Kernel-friendly layout of one core-primitive call, shared by the forward and backward kernels.

The kernels see every call in one shape, whatever produced it:

* query rows are cut in tiles of ``ROWS_PER_WG`` rows per compute warpgroup; logical blocks
  are padded to whole tiles (padding queries have position -1 and are sliced off);
* the key stream of a query tile is its diagonal key block followed by the extra keys of its
  set, both in tiles of ``key_tile`` keys, both padded to whole tiles with masked keys;
* everything a kernel needs to know about a key besides k and v travels in a small float32
  "meta" array next to it, one row per quantity, so one bulk copy per pipeline step brings it:
  row ``BIAS`` is the additive log2-domain logit term (``-inf`` for a key that never counts
  for any query, ``extra_bias * log2(e)`` for a counted extra key, 0 for a diagonal key);
  row ``BLOCK`` the block id of a shared extra key (same-block exclusion); row ``POS`` the
  key's original position, for the masks that depend on the query (causal, window).

Positions travel as float32, exact below 2**24; longer sequences are rejected.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from hyperattention_jax import core
from hyperattention_jax.util import cdiv

LOG2E = float(np.log2(np.e))
ROWS_PER_WG = 64          # wgmma's M: query rows (forward, dq) or keys (dk/dv) per warpgroup
MAX_EXACT_POSITION = 1 << 24
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128, 256)

# Rows of the meta arrays.
BIAS = 0


def round_up(x: int, multiple: int) -> int:
  return cdiv(x, multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Problem:
  """Static description of one call in the kernels' layout.

  Attributes:
    batch, q_heads, kv_heads: sizes; query head ``h`` reads key head ``h // groups``.
    dk, dv: head dims of queries/keys and of values.
    num_blocks: logical blocks.
    block_q, block_k: padded rows per block (multiples of the tiles).
    num_sets: extra key sets (1: shared by every block, or ``num_blocks``).
    num_extra: padded extra keys per set (0 when there are none).
    extra_keys: extra keys per set before padding.
    spec: the caller's ``core.BlockSpec`` (rules, causal, sink and window).
    exclude_in_kernel: shared extra keys whose block equals the query's block are dropped in
      the kernel (only for one set shared by several blocks; otherwise folded in BIAS).
    dtype: dtype of q, k and v.
    q_gathered: the forward kernel reads the query rows through an index (``q`` is then the
      sequence-major source seen as rows ``[R, dk]`` and ``q_rows [B, Hq, Nq]`` int32 holds
      the source row of each sorted query row, ``R`` or more for padding).
    kv_gathered: the same for the diagonal keys and values of the forward kernel (``k`` and
      ``v`` are source rows, ``k_rows [B, Hk, Nk]`` the index; extra keys stay dense).
  """

  batch: int
  q_heads: int
  kv_heads: int
  dk: int
  dv: int
  num_blocks: int
  block_q: int
  block_k: int
  num_sets: int
  num_extra: int
  extra_keys: int
  spec: core.BlockSpec
  exclude_in_kernel: bool
  dtype: np.dtype
  q_gathered: bool = False
  kv_gathered: bool = False

  @property
  def groups(self) -> int:
    return self.q_heads // self.kv_heads

  @property
  def q_len(self) -> int:
    return self.num_blocks * self.block_q

  @property
  def k_len(self) -> int:
    return self.num_blocks * self.block_k

  @property
  def seq_axis(self) -> int:
    """The rows axis of q, k, v and o (and their gradients): 1 when sequence-major."""
    return 1 if self.spec.sequence_major else 2

  def rows_shape(self, heads: int, length: int, dim: int):
    """Shape of a q/k/v-like array of ``heads`` heads and ``length`` rows in this call."""
    if self.spec.sequence_major:
      return (self.batch, length, heads, dim)
    return (self.batch, heads, length, dim)

  def rows_of(self, ref, batch, head, rows):
    """``rows`` of one (batch, head) of a q/k/v-like GMEM ref, in either layout."""
    return ref.at[batch, rows, head] if self.spec.sequence_major else ref.at[batch, head, rows]

  @property
  def needs_positions(self) -> bool:
    """Whether some mask depends on the query too (so positions must reach the kernel)."""
    return self.spec.causal or self.spec.window_size > 0

  @property
  def block_row(self) -> int | None:
    return 1 if self.exclude_in_kernel else None

  @property
  def pos_row(self) -> int | None:
    return 1 + self.exclude_in_kernel if self.needs_positions else None

  @property
  def meta_rows(self) -> int:
    return 1 + self.exclude_in_kernel + self.needs_positions


class Operands(dict):
  """The arrays of a call in the kernels' layout (a dict, so it is a pytree).

  Keys: ``q [B, Hq, Nq, dk]``, ``k [B, Hk, Nk, dk]``, ``v [B, Hk, Nk, dv]`` (rows on axis 1
  and heads on axis 2 with ``spec.sequence_major``),
  ``k_meta [B, Hk, R, Nk]``, ``extra_k [B, Hk, E, M, dk]``, ``extra_v [B, Hk, E, M, dv]``,
  ``extra_meta [B, Hk, E, R, M]``, ``q_pos [B, Hq, Nq]`` float32, ``coef [2, 128]`` float32
  (row 0: ``scale * log2(e)``, row 1: ``scale``, repeated along the row), ``diag_live
  [B, Hk, num_blocks]`` and ``extra_live [B, Hk, E]`` int32: how many leading keys of a
  diagonal block or an extra set may count (the kernels skip the tiles after them).
  """


jax.tree_util.register_pytree_node(
    Operands, lambda d: (tuple(d[k] for k in sorted(d)), tuple(sorted(d))),
    lambda keys, values: Operands(zip(keys, values)))


def unsupported(message: str):
  """The error that sends the dispatcher to the next implementation."""
  return NotImplementedError(f"mosaic_gpu block_attention: {message}")


def describe(q, k, v, extra_pos, *, spec: core.BlockSpec, q_multiple: int, k_multiple: int,
             extra_multiple: int) -> Problem:
  """Checks that the kernels handle a call and returns its static description.

  Args:
    q, k, v, extra_pos: the call's arrays (shapes and dtypes are read).
    spec: the call's block spec.
    q_multiple, k_multiple, extra_multiple: the kernels' tiles: blocks of queries, blocks
      of keys and extra sets are padded to multiples of these.

  Raises:
    NotImplementedError: for calls outside the kernels (dtype, head dim, shapes).
  """
  rows, heads = (1, 2) if spec.sequence_major else (2, 1)   # axes of q, k, v
  batch, dk, dv = q.shape[0], q.shape[3], v.shape[3]
  q_len, q_heads = q.shape[rows], q.shape[heads]
  k_len, kv_heads = v.shape[rows], v.shape[heads]
  dtype = jnp.dtype(q.dtype)
  if dtype not in SUPPORTED_DTYPES or k.dtype != dtype or v.dtype != dtype:
    raise unsupported(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}; needs bfloat16 or float16.")
  if dk not in SUPPORTED_HEAD_DIMS or dv not in SUPPORTED_HEAD_DIMS:
    raise unsupported(f"head dims dk={dk}, dv={dv}; supported: {SUPPORTED_HEAD_DIMS}.")
  if q_heads % kv_heads:
    raise unsupported(f"q_heads={q_heads} is not a multiple of kv_heads={kv_heads}.")
  num_blocks = q_len // spec.block_q
  if num_blocks * spec.block_q != q_len or num_blocks * spec.block_k != k_len:
    raise unsupported(f"lengths {q_len}, {k_len} do not match {num_blocks} blocks of "
                      f"block_q={spec.block_q}, block_k={spec.block_k}.")
  if spec.causal and spec.block_q != spec.block_k:
    raise unsupported(f"causal blocks need block_q == block_k; got {spec.block_q}, "
                      f"{spec.block_k}.")
  if max(q_len, k_len) >= MAX_EXACT_POSITION:
    raise unsupported(f"lengths {q_len}, {k_len} exceed {MAX_EXACT_POSITION}.")
  num_sets, num_extra = extra_pos.shape[2], extra_pos.shape[3]
  if num_sets not in (1, num_blocks):
    raise unsupported(f"{num_sets} extra key sets for {num_blocks} blocks.")
  if spec.causal:  # query and key tiles must line up for the causal tile skipping
    block_q = block_k = round_up(spec.block_q, int(np.lcm(q_multiple, k_multiple)))
  else:
    block_q = round_up(spec.block_q, q_multiple)
    block_k = round_up(spec.block_k, k_multiple)
  return Problem(
      batch=batch, q_heads=q_heads, kv_heads=kv_heads, dk=dk, dv=dv, num_blocks=num_blocks,
      block_q=block_q, block_k=block_k, num_sets=num_sets,
      num_extra=round_up(num_extra, extra_multiple) if num_extra else 0,
      extra_keys=num_extra, spec=spec,
      exclude_in_kernel=num_sets == 1 and num_blocks > 1 and num_extra > 0, dtype=dtype)


def _pad_blocks(x, num_blocks: int, block: int, padded: int, value=0, axis: int = 2):
  """Pads each of the ``num_blocks`` blocks on ``axis`` from ``block`` to ``padded`` rows."""
  if block == padded:
    return x
  shape = x.shape
  x = x.reshape(shape[:axis] + (num_blocks, block) + shape[axis + 1:])
  pad = [(0, 0)] * x.ndim
  pad[axis + 1] = (0, padded - block)
  x = jnp.pad(x, pad, constant_values=value)
  return x.reshape(shape[:axis] + (num_blocks * padded,) + shape[axis + 1:])


def unpad_blocks(x, num_blocks: int, block: int, padded: int, axis: int = 2):
  """Inverse of ``_pad_blocks``."""
  if block == padded:
    return x
  shape = x.shape
  x = x.reshape(shape[:axis] + (num_blocks, padded) + shape[axis + 1:])
  x = jax.lax.slice_in_dim(x, 0, block, axis=axis + 1)
  return x.reshape(shape[:axis] + (num_blocks * block,) + shape[axis + 1:])


def _column_keep(pos, rule: str, spec: core.BlockSpec):
  """The part of ``core.key_mask`` that depends on the key alone.

  Exact when the mask has no query-dependent part beyond causality (no window); with a
  window only validity is decided here and the kernel evaluates the rest per tile.
  """
  if spec.window_size > 0:
    return pos >= 0
  column_spec = dataclasses.replace(spec, causal=False)
  return core.key_mask(pos, pos, rule, column_spec)


def _meta(bias, block, pos, prob: Problem):
  rows = [bias]
  if prob.exclude_in_kernel:
    rows.append(block.astype(jnp.float32))
  if prob.needs_positions:
    rows.append(pos.astype(jnp.float32))
  return jnp.stack(rows, axis=-2)


def _pad_last(x, size: int, value):
  if x.shape[-1] == size:
    return x
  pad = [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])]
  return jnp.pad(x, pad, constant_values=value)


def pad(q, k, v, q_pos, k_pos, extra_k, extra_v, extra_pos, extra_block, prob: Problem):
  """Pads blocks and extra sets to whole tiles (a no-op for aligned calls).

  Padding queries and keys get position -1; padding extra keys position and block -1.
  """
  spec = prob.spec
  nb = prob.num_blocks
  m = max(prob.num_extra, 1)  # a dummy (masked) extra key keeps shapes non-empty
  rows = prob.seq_axis
  return dict(
      q=_pad_blocks(q, nb, spec.block_q, prob.block_q, axis=rows),
      k=_pad_blocks(k, nb, spec.block_k, prob.block_k, axis=rows),
      v=_pad_blocks(v, nb, spec.block_k, prob.block_k, axis=rows),
      q_pos=_pad_blocks(q_pos.astype(jnp.int32), nb, spec.block_q, prob.block_q, value=-1),
      k_pos=_pad_blocks(k_pos.astype(jnp.int32), nb, spec.block_k, prob.block_k, value=-1),
      extra_k=_pad_axis3(extra_k, m), extra_v=_pad_axis3(extra_v, m),
      extra_pos=_pad_last(extra_pos.astype(jnp.int32), m, -1),
      extra_block=_pad_last(extra_block.astype(jnp.int32), m, -1))


def operands(padded, extra_bias, scale, prob: Problem) -> Operands:
  """The kernels' operands from padded arrays (``pad``): the meta rows and coefficients."""
  spec = prob.spec
  f32 = jnp.float32
  ninf = -jnp.inf
  k_pos = padded["k_pos"]
  k_bias = jnp.where(_column_keep(k_pos, spec.diagonal_keys, spec), 0.0, ninf).astype(f32)
  k_meta = _meta(k_bias, jnp.full(k_pos.shape, -1, jnp.int32), k_pos, prob)

  extra_pos, extra_block = padded["extra_pos"], padded["extra_block"]
  batch, _, num_sets, _ = extra_pos.shape
  keep = _column_keep(extra_pos, spec.extra_keys, spec)
  if not prob.exclude_in_kernel:  # set e serves block e (or the single block): fold it in
    own_block = jnp.arange(num_sets, dtype=jnp.int32).reshape(1, 1, num_sets, 1)
    keep = keep & (extra_block != own_block)
  bias = (jnp.asarray(extra_bias, f32) * LOG2E).reshape(batch, 1, 1, 1)
  extra_meta = _meta(jnp.where(keep, bias, ninf), extra_block, extra_pos, prob)

  scale = jnp.asarray(scale, f32)
  coef = jnp.stack([jnp.full((128,), scale * LOG2E, f32), jnp.full((128,), scale, f32)])
  return Operands(q=padded["q"], k=padded["k"], v=padded["v"], k_meta=k_meta,
                  extra_k=padded["extra_k"], extra_v=padded["extra_v"], extra_meta=extra_meta,
                  q_pos=padded["q_pos"].astype(f32), coef=coef,
                  diag_live=live_prefix(k_bias, prob.num_blocks),
                  extra_live=live_prefix(extra_meta[..., BIAS, :], 1)[..., 0])


def live_prefix(bias, num_groups: int):
  """Per group of keys on the last axis: 1 + the index of its last key that can count.

  Keys after it never count (their BIAS is ``-inf``), so the kernels stop there: a
  block of the non-causal local part holds no sink and costs nothing, padding is skipped.
  """
  shape = bias.shape[:-1] + (num_groups, bias.shape[-1] // num_groups)
  index = jnp.arange(1, shape[-1] + 1, dtype=jnp.int32)
  return jnp.max(jnp.where(bias.reshape(shape) > -jnp.inf, index, 0), axis=-1)


def _pad_axis3(x, size: int):
  if x.shape[3] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[3] = (0, size - x.shape[3])
  return jnp.pad(x, pad)
