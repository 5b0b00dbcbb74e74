"""Backward Mosaic TPU kernels of the core primitive: dq, and dk/dv (diagonal and extra keys).

With ``p = exp(s - lse)`` recomputed per tile and ``delta = rowsum(dO * O) - dlse``
(the lse cotangent folds into delta), every kernel uses ``ds = p * (dp - delta)`` with
``dp = dO v^T``; the logit gradient is ``scale * ds``.

* dq: grid and key walk of the forward kernel; it also sums ``ds * (q k^T)`` (the scale's
  gradient) and, over the extra keys, ``ds`` (the bias's) per query tile.
* dk/dv: one call for the diagonal key tiles and one for the extra key tiles, grid
  ``(batch, kv_head, set, key_tile, r)``, where the sequential ``r`` walks every (head
  pack of the group, block reading the set, query tile) that reads the key tile, so
  the gradients of a shared extra set accumulate over all blocks in VMEM. These
  kernels are transposed, keys along sublanes and query rows along lanes, so the
  per-row lse and delta are plain rows.
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
                                                            for_each_key_tile, smem_spec)
from hyperattention_jax.kernels.mosaic_tpu.tiling import NUM_LANES, NUM_SUBLANES, TilePlan


def _dq_kernel(scale_ref, bias_ref, q_ref, q_pos_ref, lse_ref, delta_ref, do_ref, k_ref, v_ref,
               k_pos_ref, *refs, spec: core.BlockSpec, plan: TilePlan, precision):
  if plan.has_extra:
    extra_refs, (dq_ref, dscale_ref, dbias_ref, dq_acc, dscale_acc, dbias_acc) = (
        refs[:4], refs[4:])
  else:
    extra_refs, (dq_ref, dscale_ref, dq_acc, dscale_acc) = (), refs
    dbias_ref = dbias_acc = None
  batch, block = pl.program_id(BATCH_AXIS), pl.program_id(BLOCK_AXIS)
  step = pl.program_id(STEP_AXIS)
  heads = q_ref.shape[0]
  scale = scale_ref[0]

  @pl.when(step == 0)
  def _init():
    for acc in (dq_acc, dscale_acc, dbias_acc):
      if acc is not None:
        acc[...] = jnp.zeros(acc.shape, jnp.float32)

  def attend(k, v, k_pos, rule, mask_more=None, bias=None):
    """Every head of the step against one key tile (shared by the heads)."""
    for head in range(heads):
      head_pos_ref = q_pos_ref.at[head]

      @pl.when(common.may_count(common.row(head_pos_ref), k_pos, spec.causal))
      def _():
        raw_logits = common.matmul(q_ref[head], k, common.NT_DIMS, precision)
        logits = scale * raw_logits if bias is None else scale * raw_logits + bias
        keep = common.tile_mask(common.column(head_pos_ref), k_pos, rule, spec, logits.shape)
        if mask_more is not None:
          keep &= mask_more(logits.shape)
        p = jnp.where(keep, jnp.exp(logits - common.column(lse_ref.at[head])), 0.0)
        dp = common.matmul(do_ref[head], v, common.NT_DIMS, precision)
        ds = p * (dp - common.column(delta_ref.at[head]))
        dq_acc[head] += common.matmul(ds.astype(k.dtype), k, common.NN_DIMS, precision)
        # d/dscale of scale * q.k + bias is q.k; d/dbias is 1 on the extra logits.
        dscale_acc[head] += jnp.sum(ds * raw_logits, axis=1, keepdims=True)
        if bias is not None:
          dbias_acc[head] += jnp.sum(ds, axis=1, keepdims=True)

  for_each_key_tile(step, plan, spec, attend, (k_ref, v_ref, k_pos_ref), extra_refs, bias_ref,
                    batch=batch, block=block)

  @pl.when(step == plan.k_tiles + plan.extra_steps - 1)
  def _finish():
    dq_ref[...] = (scale * dq_acc[...]).astype(dq_ref.dtype)
    # Per-tile partial sums, one (8, 128) block per head; every entry holds the sum.
    for acc, out in ((dscale_acc, dscale_ref), (dbias_acc, dbias_ref)):
      if acc is not None:
        for head in range(heads):
          out[head] = jnp.broadcast_to(jnp.sum(acc[head], axis=0, keepdims=True),
                                       out.shape[1:])


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
  batch, q_heads, _, dk = q.shape
  kv_heads, dv = k.shape[1], v.shape[-1]
  maps = QueryTileMaps(plan, q_heads // kv_heads)
  in_specs = [smem_spec(), smem_spec(), maps.query_spec(dk), maps.query_rows_spec(),
              maps.query_rows_spec(), maps.query_rows_spec(), maps.query_spec(dv),
              *maps.key_specs(dk, dv)]
  args = [scale, bias, q, q_rows, lse_rows, delta_rows, do, k, v, k_rows]
  if plan.has_extra:
    args += [extra_k, extra_v, extra_rows, extra_block_rows]
  num_stats = 2 if plan.has_extra else 1
  stats_shape = (batch, q_heads, plan.num_blocks * plan.q_tiles, NUM_SUBLANES, NUM_LANES)
  stats_spec = pl.BlockSpec((None, plan.heads_per_step, None, NUM_SUBLANES, NUM_LANES),
                            maps.q_stats)
  state = (plan.heads_per_step, plan.q_tile)
  kernel = functools.partial(_dq_kernel, spec=spec, plan=plan,
                             precision=common.precision_for(q.dtype))
  grid = maps.grid(batch, kv_heads)
  dq, *stats = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[maps.query_spec(dk)] + [stats_spec] * num_stats,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)]
      + [jax.ShapeDtypeStruct(stats_shape, jnp.float32)] * num_stats,
      scratch_shapes=[pltpu.VMEM(state + (dk,), jnp.float32)]
      + [pltpu.VMEM(state + (NUM_LANES,), jnp.float32)] * num_stats,
      compiler_params=compiler_params(len(grid), vmem_limit_bytes),
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
  scale = scale_ref[0]

  @pl.when(r == 0)
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  k, v = k_ref[...], v_ref[...]
  k_pos = common.column(k_pos_ref)
  rule = spec.extra_keys if is_extra else spec.diagonal_keys
  if is_extra:
    block = key_set * blocks_per_set + jax.lax.rem(jax.lax.div(r, q_tiles), blocks_per_set)
    key_block = common.column(key_block_ref)

  for head in range(q_ref.shape[0]):  # the heads of the pack share this key tile
    q_pos = common.row(q_pos_ref.at[head])

    @pl.when(common.may_count(q_pos, common.row(k_pos_ref), spec.causal))
    def _():
      q, do = q_ref[head], do_ref[head]
      logits = scale * common.matmul(k, q, common.NT_DIMS, precision)  # [tk, tq]
      keep = common.tile_mask(q_pos, k_pos, rule, spec, logits.shape)
      if is_extra:
        logits += bias_ref[batch]
        keep &= jnp.broadcast_to(key_block, logits.shape) != block
      p = jnp.where(keep, jnp.exp(logits - common.row(lse_ref.at[head])), 0.0)
      dv_acc[...] += common.matmul(p.astype(do.dtype), do, common.NN_DIMS, precision)
      dp = common.matmul(v, do, common.NT_DIMS, precision)
      ds = p * (dp - common.row(delta_ref.at[head]))
      dk_acc[...] += common.matmul(ds.astype(q.dtype), q, common.NN_DIMS, precision)

  @pl.when(r == num_steps - 1)
  def _finish():
    dk_ref[...] = (scale * dk_acc[...]).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


class _KeyTileMaps:
  """Index maps of the dk/dv calls, grid ``(b, kv_head, set, key_tile, r)``.

  ``r`` runs over (head pack of the group, block reading the set, query tile); a set
  is read by ``blocks_per_set`` consecutive blocks (all of them for a shared extra set,
  its own block otherwise).
  """

  def __init__(self, *, packs: int, blocks_per_set: int, q_tiles: int, keys_per_set: int,
               is_extra: bool):
    self.packs = packs
    self.blocks_per_set = blocks_per_set
    self.q_tiles = q_tiles
    self.keys_per_set = keys_per_set
    self.is_extra = is_extra

  def _query(self, hk, key_set, r):
    per_pack = self.blocks_per_set * self.q_tiles
    heads = hk * self.packs + jax.lax.div(r, per_pack)
    block = key_set * self.blocks_per_set + jax.lax.rem(jax.lax.div(r, self.q_tiles),
                                                        self.blocks_per_set)
    return heads, block * self.q_tiles + jax.lax.rem(r, self.q_tiles)

  def q_tile(self, b, hk, key_set, t, r):
    del t
    heads, tile = self._query(hk, key_set, r)
    return b, heads, tile, 0

  def q_rows(self, b, hk, key_set, t, r):
    del t
    heads, tile = self._query(hk, key_set, r)
    return b, heads, 0, tile

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
  heads = plan.heads_per_step_dkv
  packs = q_heads // kv_heads // heads
  maps = _KeyTileMaps(packs=packs, blocks_per_set=blocks_per_set, q_tiles=q_tiles,
                      keys_per_set=key_tiles, is_extra=is_extra)
  num_steps = packs * blocks_per_set * q_tiles
  q_rows_spec = pl.BlockSpec((None, heads, NUM_SUBLANES, plan.q_tile_dkv), maps.q_rows)
  in_specs = [smem_spec(), smem_spec(),
              pl.BlockSpec((None, heads, plan.q_tile_dkv, dk), maps.q_tile),
              q_rows_spec, q_rows_spec, q_rows_spec,
              pl.BlockSpec((None, heads, plan.q_tile_dkv, dv), maps.q_tile),
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
  grid = (batch, kv_heads, num_sets, key_tiles, num_steps)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[pl.BlockSpec(key_spec(dk), maps.k_tile), pl.BlockSpec(key_spec(dv), maps.k_tile)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((tile, dk), jnp.float32), pltpu.VMEM((tile, dv), jnp.float32)],
      compiler_params=compiler_params(len(grid), vmem_limit_bytes),
      interpret=interpret,
      name="hyperattention_block_dkv_extra" if is_extra else "hyperattention_block_dkv",
  )(*args)
