"""Backward Mosaic TPU kernels of the core primitive: dq, and dk/dv (diagonal and extra keys).

With ``p = exp(s - lse)`` recomputed per tile and ``delta = rowsum(dO * O) - dlse``
(the lse cotangent folds into delta), every kernel uses
``ds = p * (dp - delta)``, ``dp = dO v^T``; the logit gradient is ``scale * ds``.

* dq: grid and key walk of the forward kernel; it also sums ``ds * (q k^T)`` (the scale's
  gradient) and, over the extra keys, ``ds`` (the bias's) per query tile.
* dk/dv: one call for the diagonal key tiles and one for the extra key tiles, grid
  ``(batch, kv_head, set, key_tile, r)``, where the sequential ``r`` walks every
  (query head of the group, block reading the set, query tile) that reads the key tile,
  so the gradients of a shared extra set accumulate over all blocks in VMEM. These
  kernels are transposed: keys along sublanes, query rows along lanes, so the per-row
  lse and delta are plain rows.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hyperattention_jax import core
from hyperattention_jax.kernels.mosaic_tpu import common
from hyperattention_jax.kernels.mosaic_tpu.forward import (BATCH_AXIS, BLOCK_AXIS, STEP_AXIS,
                                                            QueryTileMaps, compiler_params,
                                                            smem_spec)
from hyperattention_jax.kernels.mosaic_tpu.tiling import NUM_LANES, NUM_SUBLANES, TilePlan


def _dq_kernel(scale_ref, bias_ref, q_ref, q_pos_ref, lse_ref, delta_ref, do_ref, k_ref, v_ref,
               k_pos_ref, *refs, spec: core.BlockSpec, plan: TilePlan, precision):
  if plan.has_extra:
    (extra_k_ref, extra_v_ref, extra_pos_ref, extra_block_ref,
     dq_ref, dscale_ref, dbias_ref, dq_acc, dscale_acc, dbias_acc) = refs
  else:
    dq_ref, dscale_ref, dq_acc, dscale_acc = refs
    dbias_ref = dbias_acc = None
  batch, block = pl.program_id(BATCH_AXIS), pl.program_id(BLOCK_AXIS)
  step = pl.program_id(STEP_AXIS)
  last_step = plan.k_tiles + plan.extra_steps - 1

  @pl.when(step == 0)
  def _init():
    for acc in (dq_acc, dscale_acc, dbias_acc):
      if acc is not None:
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

  q, do = q_ref[...], do_ref[...]
  q_pos_rows = q_pos_ref[...]
  q_pos, q_pos_row = common.column(q_pos_rows), common.row(q_pos_rows)
  lse, delta = common.column(lse_ref), common.column(delta_ref)
  scale = scale_ref[0]

  def accumulate(k, v, raw_logits, logits, keep, is_extra: bool):
    p = jnp.where(keep, jnp.exp(logits - lse), 0.0)
    dp = common.matmul(do, v, common.NT_DIMS, precision)
    ds = p * (dp - delta)
    dq_acc[...] += common.matmul(ds.astype(k.dtype), k, common.NN_DIMS, precision)
    # d/dscale of scale * (q.k) + bias is q.k; d/dbias is 1 on the extra logits.
    dscale_acc[...] += jnp.sum(ds * raw_logits, axis=1, keepdims=True)
    if is_extra:
      dbias_acc[...] += jnp.sum(ds, axis=1, keepdims=True)

  @pl.when(step < plan.k_tiles)
  def _diagonal():
    k_pos = common.row(k_pos_ref)

    @pl.when(common.may_count(q_pos_row, k_pos, spec.causal))
    def _():
      k = k_ref[...]
      raw_logits = common.matmul(q, k, common.NT_DIMS, precision)
      keep = common.tile_mask(q_pos, k_pos, spec.diagonal_keys, spec, raw_logits.shape)
      accumulate(k, v_ref[...], raw_logits, scale * raw_logits, keep, False)

  def extra_chunk(start: int):
    chunk = pl.ds(start, plan.extra_chunk)
    extra_pos = extra_pos_ref[:1, chunk]

    @pl.when(common.may_count(q_pos_row, extra_pos, spec.causal))
    def _():
      k = extra_k_ref[chunk, :]
      raw_logits = common.matmul(q, k, common.NT_DIMS, precision)
      keep = common.tile_mask(q_pos, extra_pos, spec.extra_keys, spec, raw_logits.shape)
      keep &= jnp.broadcast_to(extra_block_ref[:1, chunk], raw_logits.shape) != block
      accumulate(k, extra_v_ref[chunk, :], raw_logits, scale * raw_logits + bias_ref[batch],
                 keep, True)

  if plan.has_extra and plan.extra_resident:
    @pl.when(step == plan.k_tiles - 1)
    def _resident_extras():
      for start in range(0, plan.extra_padded, plan.extra_chunk):
        extra_chunk(start)
  elif plan.has_extra:
    @pl.when(step >= plan.k_tiles)
    def _streamed_extras():
      extra_chunk(0)

  @pl.when(step == last_step)
  def _finish():
    dq_ref[...] = (scale * dq_acc[...]).astype(dq_ref.dtype)
    # Per-tile partial sums, one (8, 128) block each; every entry holds the sum.
    for acc, out in ((dscale_acc, dscale_ref), (dbias_acc, dbias_ref)):
      if acc is not None:
        out[...] = jnp.broadcast_to(jnp.sum(acc[...], axis=0, keepdims=True), out.shape)


def dq_call(q, k, v, extra_k, extra_v, scale, bias, q_rows, k_rows, extra_rows,
            extra_block_rows, lse_rows, delta_rows, do, *, spec: core.BlockSpec, plan: TilePlan,
            vmem_limit_bytes, interpret):
  """dq and the per-tile partial sums of the scale and bias gradients.

  Arguments as ``forward.forward``, plus ``lse_rows`` and ``delta_rows``
  ``[B, Hq, 8, nq]`` float32 and ``do [B, Hq, nq, dv]``.

  Returns:
    ``dq`` like q; ``dscale_parts`` and (with extra keys, else None) ``dbias_parts``,
    ``[B, Hq, nb * q_tiles, 8, 128]`` float32 whose entries all hold the tile's sum.
  """
  batch, q_heads, q_len, dk = q.shape
  kv_heads, dv = k.shape[1], v.shape[-1]
  maps = QueryTileMaps(plan, q_heads // kv_heads)
  q_rows_spec = pl.BlockSpec((None, None, NUM_SUBLANES, plan.q_tile), maps.q_rows)
  in_specs = [smem_spec(), smem_spec(),
              pl.BlockSpec((None, None, plan.q_tile, dk), maps.q_tile),
              q_rows_spec, q_rows_spec, q_rows_spec,
              pl.BlockSpec((None, None, plan.q_tile, dv), maps.q_tile),
              *maps.key_specs(dk, dv)]
  args = [scale, bias, q, q_rows, lse_rows, delta_rows, do, k, v, k_rows]
  if plan.has_extra:
    args += [extra_k, extra_v, extra_rows, extra_block_rows]
  num_stats = 2 if plan.has_extra else 1
  stats_shape = (batch, q_heads, plan.num_blocks * plan.q_tiles, NUM_SUBLANES, NUM_LANES)
  stats_spec = pl.BlockSpec((None, None, None, NUM_SUBLANES, NUM_LANES), maps.q_stats)
  kernel = functools.partial(_dq_kernel, spec=spec, plan=plan,
                             precision=common.precision_for(q.dtype))
  dq, *stats = pl.pallas_call(
      kernel,
      grid=maps.grid(batch, kv_heads),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, plan.q_tile, dk), maps.q_tile)]
      + [stats_spec] * num_stats,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)]
      + [jax.ShapeDtypeStruct(stats_shape, jnp.float32)] * num_stats,
      scratch_shapes=[pltpu.VMEM((plan.q_tile, dk), jnp.float32)]
      + [pltpu.VMEM((plan.q_tile, NUM_LANES), jnp.float32)] * num_stats,
      compiler_params=compiler_params(5, vmem_limit_bytes),
      interpret=interpret,
      name="hyperattention_block_dq",
  )(*args)
  return dq, stats[0], (stats[1] if plan.has_extra else None)


def _dkv_kernel(scale_ref, bias_ref, q_ref, q_pos_ref, lse_ref, delta_ref, do_ref, k_ref, v_ref,
                k_pos_ref, *refs, spec: core.BlockSpec, is_extra: bool, blocks_per_set: int,
                q_tiles: int, num_steps: int, precision):
  if is_extra:
    key_block_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
  else:
    dk_ref, dv_ref, dk_acc, dv_acc = refs
  batch, key_set, r = pl.program_id(0), pl.program_id(2), pl.program_id(4)

  @pl.when(r == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  q_pos = common.row(q_pos_ref)

  @pl.when(common.may_count(q_pos, common.row(k_pos_ref), spec.causal))
  def _():
    q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
    logits = scale_ref[0] * common.matmul(k, q, common.NT_DIMS, precision)  # [tk, tq]
    rule = spec.extra_keys if is_extra else spec.diagonal_keys
    keep = common.tile_mask(q_pos, common.column(k_pos_ref), rule, spec, logits.shape)
    if is_extra:
      logits += bias_ref[batch]
      block = key_set * blocks_per_set + jax.lax.rem(jax.lax.div(r, q_tiles), blocks_per_set)
      keep &= jnp.broadcast_to(common.column(key_block_ref), logits.shape) != block
    p = jnp.where(keep, jnp.exp(logits - common.row(lse_ref)), 0.0)
    dv_acc[...] += common.matmul(p.astype(do.dtype), do, common.NN_DIMS, precision)
    dp = common.matmul(v, do, common.NT_DIMS, precision)
    ds = p * (dp - common.row(delta_ref))
    dk_acc[...] += common.matmul(ds.astype(q.dtype), q, common.NN_DIMS, precision)

  @pl.when(r == num_steps - 1)
  def _finish():
    dk_ref[...] = (scale_ref[0] * dk_acc[...]).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


class _KeyTileMaps:
  """Index maps of the dk/dv calls, grid ``(b, kv_head, set, key_tile, r)``.

  ``r`` runs over (query head of the group, block reading the set, query tile); a set
  is read by ``blocks_per_set`` consecutive blocks (all of them for a shared extra
  set, its own block otherwise).
  """

  def __init__(self, *, groups: int, blocks_per_set: int, q_tiles: int, keys_per_set: int,
               is_extra: bool):
    self.groups = groups
    self.blocks_per_set = blocks_per_set
    self.q_tiles = q_tiles
    self.keys_per_set = keys_per_set
    self.is_extra = is_extra

  def _query(self, hk, key_set, r):
    per_head = self.blocks_per_set * self.q_tiles
    head = hk * self.groups + jax.lax.div(r, per_head)
    block = key_set * self.blocks_per_set + jax.lax.rem(jax.lax.div(r, self.q_tiles),
                                                        self.blocks_per_set)
    return head, block * self.q_tiles + jax.lax.rem(r, self.q_tiles)

  def q_tile(self, b, hk, key_set, t, r):
    del t
    head, tile = self._query(hk, key_set, r)
    return b, head, tile, 0

  def q_rows(self, b, hk, key_set, t, r):
    del t
    head, tile = self._query(hk, key_set, r)
    return b, head, 0, tile

  def k_tile(self, b, hk, key_set, t, r):
    del r
    if self.is_extra:
      return b, hk, key_set, t, 0
    return b, hk, key_set * self.keys_per_set + t, 0

  def k_rows(self, b, hk, key_set, t, r):
    del r
    if self.is_extra:
      return b, hk, key_set, 0, t
    return b, hk, 0, key_set * self.keys_per_set + t


def dkv_call(q, k, v, scale, bias, q_rows, k_rows, lse_rows, delta_rows, do, key_block_rows=None,
             *, spec: core.BlockSpec, plan: TilePlan, is_extra: bool, vmem_limit_bytes, interpret):
  """dk and dv of the diagonal keys, or (``is_extra``) of the extra keys.

  Args:
    q, q_rows, lse_rows, delta_rows, do: query side, as in ``dq_call``.
    k, v, k_rows: the diagonal keys (``[B, Hk, nb * padded_k, d]``, rows
      ``[B, Hk, 8, nb * padded_k]``) or the extra keys (``[B, Hk, E, extra_padded, d]``,
      rows ``[B, Hk, E, 8, extra_padded]``).
    scale, bias: as in ``forward.forward``.
    key_block_rows: with ``is_extra``, the extra keys' blocks, shaped like ``k_rows``.
    spec, plan, vmem_limit_bytes, interpret: as in ``forward.forward``.

  Returns:
    ``dk`` and ``dv``, shaped like ``k`` and ``v``.
  """
  batch, q_heads, _, dk = q.shape
  kv_heads, dv = k.shape[1], v.shape[-1]
  q_tiles = plan.padded_q // plan.q_tile_dkv
  if is_extra:
    tile, num_sets = plan.extra_chunk, plan.num_extra_sets
    key_tiles = plan.extra_padded // tile
    blocks_per_set = plan.num_blocks if num_sets == 1 else 1
    key_spec = lambda d: (None, None, None, tile, d)
    rows_spec = (None, None, None, NUM_SUBLANES, tile)
  else:
    tile, num_sets, blocks_per_set = plan.k_tile_dkv, plan.num_blocks, 1
    key_tiles = plan.padded_k // tile
    key_spec = lambda d: (None, None, tile, d)
    rows_spec = (None, None, NUM_SUBLANES, tile)
  groups = q_heads // kv_heads
  maps = _KeyTileMaps(groups=groups, blocks_per_set=blocks_per_set, q_tiles=q_tiles,
                      keys_per_set=key_tiles, is_extra=is_extra)
  num_steps = groups * blocks_per_set * q_tiles
  q_rows_spec = pl.BlockSpec((None, None, NUM_SUBLANES, plan.q_tile_dkv), maps.q_rows)
  in_specs = [smem_spec(), smem_spec(),
              pl.BlockSpec((None, None, plan.q_tile_dkv, dk), maps.q_tile),
              q_rows_spec, q_rows_spec, q_rows_spec,
              pl.BlockSpec((None, None, plan.q_tile_dkv, dv), maps.q_tile),
              pl.BlockSpec(key_spec(dk), maps.k_tile),
              pl.BlockSpec(key_spec(dv), maps.k_tile),
              pl.BlockSpec(rows_spec, maps.k_rows)]
  args = [scale, bias, q, q_rows, lse_rows, delta_rows, do, k, v, k_rows]
  if is_extra:
    in_specs.append(pl.BlockSpec(rows_spec, maps.k_rows))
    args.append(key_block_rows)
  kernel = functools.partial(_dkv_kernel, spec=spec, is_extra=is_extra,
                             blocks_per_set=blocks_per_set, q_tiles=q_tiles, num_steps=num_steps,
                             precision=common.precision_for(q.dtype))
  return pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, num_sets, key_tiles, num_steps),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec(key_spec(dk), maps.k_tile), pl.BlockSpec(key_spec(dv), maps.k_tile)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((tile, dk), jnp.float32), pltpu.VMEM((tile, dv), jnp.float32)],
      compiler_params=compiler_params(4, vmem_limit_bytes),
      interpret=interpret,
      name="hyperattention_block_dkv_extra" if is_extra else "hyperattention_block_dkv",
  )(*args)
