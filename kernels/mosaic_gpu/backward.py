"""Backward kernels: dq (key-streaming, like the forward) and dk/dv (query-streaming).

With ``p = exp(s - lse)`` recomputed from the saved lse, ``dp = dO v^T`` and
``delta = rowsum(dO * o) - dlse`` (the lse cotangent enters here), the logit gradient is
``ds = p * (dp - delta)``; the logits are ``scale * q.k + bias``, so ``dq = scale * ds k``,
``dk = scale * ds^T q``, ``dv = p^T dO``, ``dscale = sum(ds * q.k)`` and
``dbias = sum(ds)`` over the extra keys.

* dq: the forward's grid and key stream; it also writes per-row partial sums of the scale
  and bias gradients, summed outside in a fixed order.
* dk/dv: one CTA per tile of ``compute_wgs * 64`` keys, streaming the query tiles that read
  them, for every query head of the key head's group (GQA without repeating k and v).
  Diagonal keys of block b are read by block b's queries (from the key tile on, when
  causal); the extra set of block b by block b's queries; one shared extra set by every
  query, split in ``chunks`` ranges whose partial float32 sums are added outside.

Every sum has a fixed order, so two runs give identical bits.
"""

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from hyperattention_jax.kernels.mosaic_gpu import common
from hyperattention_jax.kernels.mosaic_gpu.common import COL, ROW, col_vec, row_vec
from hyperattention_jax.kernels.mosaic_gpu.layout import BIAS, ROWS_PER_WG, Operands, Problem
from hyperattention_jax.util import cdiv

# Rows of the per-query meta array of the backward kernels.
LSE2 = 0     # lse * log2(e); +inf where no key counted (so p = 0)
DELTA = 1    # rowsum(dO * o) - dlse
Q_POS = 2    # the query's position (only when a mask depends on it)


def query_meta_rows(prob: Problem) -> int:
  return 2 + prob.needs_positions


def _operands(ops: Operands, do, q_meta):
  """The operands of both backward kernels, in their order."""
  return (ops["q"], ops["k"], ops["v"], ops["k_meta"], ops["extra_k"], ops["extra_v"],
          ops["extra_meta"], do, q_meta, ops["coef"], ops["diag_live"], ops["extra_live"])


def dq(ops: Operands, do, q_meta, prob: Problem, tiles: common.Tiles, *, interpret=None):
  """dq and per-row partial sums of the scale and bias gradients.

  Args:
    ops: the call in the kernels' layout.
    do: ``[B, Hq, Nq, dv]`` output cotangent.
    q_meta: ``[B, Hq, Rq, Nq]`` float32 per-query rows ``LSE2, DELTA (, Q_POS)``.
    prob, tiles, interpret: as ``forward.forward``.

  Returns:
    ``dq [B, Hq, Nq, dk]``, ``dscale_rows [B, Hq, Nq]`` and ``dbias_rows [B, Hq, Nq]``.
  """
  nw, rows, tk, stages = tiles.compute_wgs, ROWS_PER_WG, tiles.key_tile, tiles.num_stages
  item = prob.dtype.itemsize
  common.check_smem(nw * rows * (prob.dk + prob.dv) * item
                    + stages * tk * (prob.dk + prob.dv) * item + 4096, "the dq kernel")
  cta_rows = tiles.rows_per_cta
  ctas_per_block = prob.block_q // cta_rows
  spec = prob.spec
  dtype = prob.dtype
  f32 = jnp.float32
  needs_pos = prob.needs_positions
  q_rows = query_meta_rows(prob)

  def kernel(q_ref, k_ref, v_ref, kmeta_ref, xk_ref, xv_ref, xmeta_ref, do_ref, qmeta_ref,
             coef_ref, dlive_ref, xlive_ref, dq_ref, dscale_ref, dbias_ref, buffers, barriers):
    q_smem, do_smem, k_smem, v_smem, meta_smem, qmeta_smem, coef_smem, sums_smem = buffers
    q_bar, k_bar, v_bar, k_free, v_free = barriers
    cta = common.query_cta(prob, tiles, dlive_ref, xlive_ref)
    tile, head, batch, wg, block = cta.tile, cta.head, cta.batch, cta.wg, cta.block

    @pl.when(wg == nw)
    def _memory():
      common.split_registers(True, nw)
      common.stream_keys(lambda t: cta, 1, prob, tiles, (k_ref, v_ref, kmeta_ref),
                         (xk_ref, xv_ref, xmeta_ref), (k_smem, v_smem, meta_smem), (k_bar, v_bar),
                         (k_free, v_free))

    @pl.when(wg < nw)
    def _compute():
      common.split_registers(False, nw)
      rows_here = pl.ds(tile * cta_rows + wg * rows, rows)
      q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
      plgpu.copy_gmem_to_smem(prob.rows_of(q_ref, batch, head, rows_here), q_tile, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(prob.rows_of(do_ref, batch, head, rows_here), do_tile,
                              q_bar.at[wg])
      plgpu.copy_gmem_to_smem(qmeta_ref.at[batch, head, :, rows_here], qmeta_smem.at[wg],
                              q_bar.at[wg])
      plgpu.copy_gmem_to_smem(coef_ref.at[:, pl.ds(0, rows)], coef_smem.at[wg], q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      qmeta = qmeta_smem.at[wg]
      lse2 = plgpu.load(qmeta.at[LSE2], layout=ROW)
      delta = plgpu.load(qmeta.at[DELTA], layout=ROW)
      q_pos = plgpu.load(qmeta.at[Q_POS], layout=ROW) if needs_pos else None
      coef = plgpu.load(coef_smem.at[wg, 0], layout=ROW)
      scale = plgpu.load(coef_smem.at[wg, 1], layout=ROW)

      def step_fn(step, carry, *, extra, masked):
        dq_acc, dscale, dbias = carry
        slot = lax.rem(step, stages)
        k_tile, v_tile, meta, width = common.key_slot(prob, tiles, (k_smem, v_smem, meta_smem),
                                                      slot, extra=extra)
        shape = (rows, width)
        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(v_bar.at[slot])
        raw, dp = common.matmuls([(shape, q_tile, k_tile, True),
                                  (shape, do_tile, v_tile, True)], interpret=interpret)
        plgpu.barrier_arrive(v_free.at[slot])
        bias = plgpu.load(meta.at[BIAS], layout=COL)
        if extra and prob.exclude_in_kernel:
          key_block = plgpu.load(meta.at[prob.block_row], layout=COL)
          bias = jnp.where(key_block == block.astype(f32), -jnp.inf, bias)
        s = raw * row_vec(coef, shape) + col_vec(bias, shape)
        if masked:
          k_pos = plgpu.load(meta.at[prob.pos_row], layout=COL)
          rule = spec.extra_keys if extra else spec.diagonal_keys
          keep = common.query_key_mask(row_vec(q_pos, shape), col_vec(k_pos, shape), rule, spec)
          s = jnp.where(keep, s, -jnp.inf)
        p = jnp.exp2(s - row_vec(lse2, shape))
        ds = p * (dp - row_vec(delta, shape))
        dscale = dscale + (ds * raw).sum(axis=1)
        if extra:
          dbias = dbias + ds.sum(axis=1)
        dq_acc = common.matmul_acc(dq_acc, ds.astype(dtype), k_tile,
                                   interpret=interpret)
        plgpu.barrier_arrive(k_free.at[slot])
        return dq_acc, dscale, dbias

      carry = (common.zeros((rows, prob.dk)), common.full((rows,), 0.0, ROW),
               common.full((rows,), 0.0, ROW))
      dq_acc, dscale, dbias = common.walk_key_steps(step_fn, carry, cta, prob, tiles)
      q_tile[...] = (dq_acc * row_vec(scale, dq_acc.shape)).astype(dtype)
      sums_smem.at[wg, 0][...] = dscale
      sums_smem.at[wg, 1][...] = dbias
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, prob.rows_of(dq_ref, batch, head, rows_here))
      plgpu.copy_smem_to_gmem(sums_smem.at[wg, 0], dscale_ref.at[batch, head, rows_here])
      plgpu.copy_smem_to_gmem(sums_smem.at[wg, 1], dbias_ref.at[batch, head, rows_here])
      plgpu.wait_smem_to_gmem(0)

  transforms = common.smem_transforms(dtype)
  buffers = (
      plgpu.SMEM((nw, rows, prob.dk), dtype, transforms=transforms),
      plgpu.SMEM((nw, rows, prob.dv), dtype, transforms=transforms),
      plgpu.SMEM((stages, tk, prob.dk), dtype, transforms=transforms),
      plgpu.SMEM((stages, tk, prob.dv), dtype, transforms=transforms),
      plgpu.SMEM((stages, prob.meta_rows, tk), f32),
      plgpu.SMEM((nw, q_rows, rows), f32),
      plgpu.SMEM((nw, 2, rows), f32),
      plgpu.SMEM((nw, 2, rows), f32),
  )
  barriers = (
      plgpu.Barrier(num_arrivals=4, num_barriers=nw),               # q, dO, q meta, coef
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),           # k and its meta
      plgpu.Barrier(num_barriers=stages),                           # v
      plgpu.Barrier(num_arrivals=nw, num_barriers=stages),
      plgpu.Barrier(num_arrivals=nw, num_barriers=stages),
  )

  row_sums = jax.ShapeDtypeStruct((prob.batch, prob.q_heads, prob.q_len), f32)
  out_type = (jax.ShapeDtypeStruct(prob.rows_shape(prob.q_heads, prob.q_len, prob.dk), dtype),
              row_sums, row_sums)
  return common.launch(
      kernel, buffers=buffers, barriers=barriers, out_type=out_type,
      grid=(prob.num_blocks * ctas_per_block, prob.q_heads, prob.batch), compute_wgs=nw,
      interpret=interpret,
  )(*_operands(ops, do, q_meta))


def extra_chunks(prob: Problem, tiles: common.Tiles, target_ctas: int = 264) -> int:
  """Query ranges that split the dk/dv work of one shared extra set (1 for per-block sets).

  ``target_ctas`` (about two CTAs per multiprocessor of an H100/H200) bounds the split.
  """
  if prob.num_sets > 1 or not prob.num_extra:
    return 1
  query_tiles = prob.q_len // tiles.query_tile
  key_ctas = prob.num_extra // tiles.rows_per_cta * prob.kv_heads * prob.batch
  return max(1, min(query_tiles, cdiv(target_ctas, key_ctas)))


def dkv(ops: Operands, do, q_meta, prob: Problem, tiles: common.Tiles, *, chunks: int,
        interpret=None):
  """dk and dv of the diagonal keys, and float32 partial sums for the extra keys.

  Args:
    ops, do, q_meta, prob, tiles, interpret: as ``dq``.
    chunks: query ranges of a shared extra set (``extra_chunks``).

  Returns:
    ``dk [B, Hk, Nk, dk]``, ``dv [B, Hk, Nk, dv]`` in the input dtype and
    ``dk_extra [chunks, B, Hk, E, M, dk]``, ``dv_extra [chunks, B, Hk, E, M, dv]`` float32.
  """
  nw, rows, tq, stages = tiles.compute_wgs, ROWS_PER_WG, tiles.query_tile, tiles.num_stages
  item = prob.dtype.itemsize
  common.check_smem(nw * rows * (prob.dk + prob.dv) * item
                    + stages * tq * (prob.dk + prob.dv) * item + 4096, "the dk/dv kernel")
  cta_keys = tiles.rows_per_cta
  spec = prob.spec
  dtype = prob.dtype
  f32 = jnp.float32
  needs_pos = prob.needs_positions
  q_rows = query_meta_rows(prob)
  diag_ctas = prob.k_len // cta_keys
  extra_key_ctas = prob.num_extra // cta_keys
  extra_ctas = prob.num_sets * extra_key_ctas * chunks
  q_tiles_per_block = prob.block_q // tq
  all_q_tiles = prob.q_len // tq
  per_chunk = cdiv(all_q_tiles, chunks)
  groups = prob.groups

  def kernel(q_ref, k_ref, v_ref, kmeta_ref, xk_ref, xv_ref, xmeta_ref, do_ref, qmeta_ref,
             coef_ref, dlive_ref, xlive_ref, dk_ref, dv_ref, dkx_ref, dvx_ref, buffers, barriers):
    k_smem, v_smem, kmeta_smem, coef_smem, q_smem, do_smem, qmeta_smem = buffers
    kv_bar, q_bar, do_bar, q_free, do_free = barriers
    cta, kv_head, batch = common.axis("tile"), common.axis("head"), common.axis("batch")
    wg = common.axis("wg")
    is_extra = cta >= diag_ctas
    # Diagonal CTAs: keys [first_key, first_key + cta_keys) of block `block`.
    first_key = jnp.minimum(cta, diag_ctas - 1) * cta_keys
    block = first_key // prob.block_k
    if extra_ctas:
      # Extra CTAs: key tile `extra_tile` of set `extra_set`, query range `chunk`.
      e = jnp.maximum(cta - diag_ctas, 0)
      chunk = lax.rem(e, chunks)
      extra_tile = lax.rem(e // chunks, extra_key_ctas)
      extra_set = e // (chunks * extra_key_ctas)
      if prob.num_sets > 1:  # the set of block b serves block b's queries
        x_start = extra_set * q_tiles_per_block
        x_end = x_start + q_tiles_per_block
      else:
        x_start = chunk * per_chunk
        x_end = jnp.minimum(x_start + per_chunk, all_q_tiles)
    if spec.causal:  # queries before the first key of the CTA see none of its keys
      d_start = block * q_tiles_per_block + (first_key - block * prob.block_k) // tq
    else:
      d_start = block * q_tiles_per_block
    d_end = (block + 1) * q_tiles_per_block
    if extra_ctas:
      q_start = jnp.where(is_extra, x_start, d_start)
      q_end = jnp.where(is_extra, x_end, d_end)
    else:
      q_start, q_end = d_start, d_end
    # Key tiles past the last key that can count get zero gradients without any work.
    live = first_key - block * prob.block_k < dlive_ref[batch, kv_head, block]
    if extra_ctas:
      extra_live = extra_tile * cta_keys < xlive_ref[batch, kv_head, extra_set]
      live = jnp.where(is_extra, extra_live, live)
    tiles_per_head = jnp.where(live, q_end - q_start, 0)
    num_steps = groups * tiles_per_head

    def query_tile(step):
      """(query head, first row) of a step: heads of the group outer, tiles inner."""
      per_head = jnp.maximum(tiles_per_head, 1)
      j = step // per_head
      return kv_head * groups + j, (q_start + lax.rem(step, per_head)) * tq

    @pl.when(wg == nw)
    def _memory():
      common.split_registers(True, nw)

      def fetch(step, slot, which):
        head, row = query_tile(step)
        rows_sl = pl.ds(row, tq)
        if which == 0:
          plgpu.copy_gmem_to_smem(prob.rows_of(q_ref, batch, head, rows_sl), q_smem.at[slot],
                                  q_bar.at[slot])
          plgpu.copy_gmem_to_smem(qmeta_ref.at[batch, head, :, rows_sl], qmeta_smem.at[slot],
                                  q_bar.at[slot])
        else:
          plgpu.copy_gmem_to_smem(prob.rows_of(do_ref, batch, head, rows_sl),
                                  do_smem.at[slot], do_bar.at[slot])

      common.produce(fetch, (q_free, do_free), num_steps=num_steps, stages=stages)

    @pl.when(wg < nw)
    def _compute():
      common.split_registers(False, nw)
      k_tile, v_tile, kmeta = k_smem.at[wg], v_smem.at[wg], kmeta_smem.at[wg]
      bar = kv_bar.at[wg]

      @pl.when(~is_extra)
      def _diagonal_keys():
        keys = pl.ds(first_key + wg * rows, rows)
        plgpu.copy_gmem_to_smem(prob.rows_of(k_ref, batch, kv_head, keys), k_tile, bar)
        plgpu.copy_gmem_to_smem(prob.rows_of(v_ref, batch, kv_head, keys), v_tile, bar)
        plgpu.copy_gmem_to_smem(kmeta_ref.at[batch, kv_head, :, keys], kmeta, bar)

      if extra_ctas:
        @pl.when(is_extra)
        def _extra_keys():
          keys = pl.ds(extra_tile * cta_keys + wg * rows, rows)
          plgpu.copy_gmem_to_smem(xk_ref.at[batch, kv_head, extra_set, keys], k_tile, bar)
          plgpu.copy_gmem_to_smem(xv_ref.at[batch, kv_head, extra_set, keys], v_tile, bar)
          plgpu.copy_gmem_to_smem(xmeta_ref.at[batch, kv_head, extra_set, :, keys], kmeta, bar)

      plgpu.copy_gmem_to_smem(coef_ref.at[:, pl.ds(0, rows)], coef_smem.at[wg], bar)
      plgpu.barrier_wait(bar)
      bias = plgpu.load(kmeta.at[BIAS], layout=ROW)
      key_block = (plgpu.load(kmeta.at[prob.block_row], layout=ROW)
                   if prob.exclude_in_kernel else None)
      k_pos = plgpu.load(kmeta.at[prob.pos_row], layout=ROW) if needs_pos else None
      coef = plgpu.load(coef_smem.at[wg, 0], layout=COL)     # scale * log2(e), per query
      scale = plgpu.load(coef_smem.at[wg, 1], layout=ROW)    # scale, per key
      shape = (rows, tq)

      def step_fn(step, carry):
        dk_acc, dv_acc = carry
        slot = lax.rem(step, stages)
        _, row = query_tile(step)
        plgpu.barrier_wait(q_bar.at[slot])
        plgpu.barrier_wait(do_bar.at[slot])
        q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
        raw, dp = common.matmuls([(shape, k_tile, q_tile, True), (shape, v_tile, do_tile, True)],
                                 interpret=interpret)
        qmeta = qmeta_smem.at[slot]
        lse2 = plgpu.load(qmeta.at[LSE2], layout=COL)
        delta = plgpu.load(qmeta.at[DELTA], layout=COL)
        key_bias = bias
        if prob.exclude_in_kernel:  # a shared extra key of the query's block was diagonal
          q_block = (row // prob.block_q).astype(f32)
          key_bias = jnp.where(is_extra & (key_block == q_block), -jnp.inf, bias)
        s = raw * col_vec(coef, shape) + row_vec(key_bias, shape)
        if needs_pos:
          q_pos = plgpu.load(qmeta.at[Q_POS], layout=COL)
          args = (col_vec(q_pos, shape), row_vec(k_pos, shape))
          keep = common.query_key_mask(*args, spec.diagonal_keys, spec)
          if extra_ctas and spec.extra_keys != spec.diagonal_keys:
            keep = jnp.where(lax.broadcast(is_extra, shape),
                             common.query_key_mask(*args, spec.extra_keys, spec), keep)
          s = jnp.where(keep, s, -jnp.inf)
        p = jnp.exp2(s - col_vec(lse2, shape))
        ds = p * (dp - col_vec(delta, shape))
        dv_acc, dk_acc = common.matmuls([(dv_acc, p.astype(dtype), do_tile, False),
                                         (dk_acc, ds.astype(dtype), q_tile, False)],
                                        interpret=interpret)
        plgpu.barrier_arrive(do_free.at[slot])
        plgpu.barrier_arrive(q_free.at[slot])
        return dk_acc, dv_acc

      dk_acc, dv_acc = lax.fori_loop(
          0, num_steps, step_fn, (common.zeros((rows, prob.dk)), common.zeros((rows, prob.dv))))
      dk_acc = dk_acc * row_vec(scale, dk_acc.shape)

      @pl.when(~is_extra)
      def _store_diagonal():
        keys = pl.ds(first_key + wg * rows, rows)
        prob.rows_of(dk_ref, batch, kv_head, keys)[...] = dk_acc.astype(dtype)
        prob.rows_of(dv_ref, batch, kv_head, keys)[...] = dv_acc.astype(dtype)

      if extra_ctas:
        @pl.when(is_extra)
        def _store_extra():
          keys = pl.ds(extra_tile * cta_keys + wg * rows, rows)
          dkx_ref.at[chunk, batch, kv_head, extra_set, keys][...] = dk_acc
          dvx_ref.at[chunk, batch, kv_head, extra_set, keys][...] = dv_acc

  transforms = common.smem_transforms(dtype)
  buffers = (
      plgpu.SMEM((nw, rows, prob.dk), dtype, transforms=transforms),
      plgpu.SMEM((nw, rows, prob.dv), dtype, transforms=transforms),
      plgpu.SMEM((nw, prob.meta_rows, rows), f32),
      plgpu.SMEM((nw, 2, rows), f32),
      plgpu.SMEM((stages, tq, prob.dk), dtype, transforms=transforms),
      plgpu.SMEM((stages, tq, prob.dv), dtype, transforms=transforms),
      plgpu.SMEM((stages, q_rows, tq), f32),
  )
  barriers = (
      plgpu.Barrier(num_arrivals=4, num_barriers=nw),         # k, v, key meta, coef
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),     # q and its meta
      plgpu.Barrier(num_barriers=stages),                     # dO
      plgpu.Barrier(num_arrivals=nw, num_barriers=stages),
      plgpu.Barrier(num_arrivals=nw, num_barriers=stages),
  )

  m = max(prob.num_extra, 1)
  out_type = (
      jax.ShapeDtypeStruct(prob.rows_shape(prob.kv_heads, prob.k_len, prob.dk), dtype),
      jax.ShapeDtypeStruct(prob.rows_shape(prob.kv_heads, prob.k_len, prob.dv), dtype),
      jax.ShapeDtypeStruct((chunks, prob.batch, prob.kv_heads, prob.num_sets, m, prob.dk), f32),
      jax.ShapeDtypeStruct((chunks, prob.batch, prob.kv_heads, prob.num_sets, m, prob.dv), f32),
  )
  return common.launch(
      kernel, buffers=buffers, barriers=barriers, out_type=out_type,
      grid=(diag_ctas + extra_ctas, prob.kv_heads, prob.batch), compute_wgs=nw,
      interpret=interpret,
  )(*_operands(ops, do, q_meta))
