"""Forward kernel: one online softmax per query tile over its key stream.

A query tile is ``compute_wgs * 64`` rows of one logical block; a CTA runs ``span`` tiles of
one query head and batch row in a loop (``Tiles.tiles_per_cta``; for causal blocks paired so
that its CTAs have equal work, ``common.cta_tile``). A tile's key stream is its diagonal key
block (in ``key_tile`` steps) followed by the extra keys of its set, and the streams of the
CTA's tiles run on through one ring. A memory warpgroup streams k, v and the key meta rows
through that ``num_stages``-deep ring of shared-memory buffers with bulk copies; each compute
warpgroup runs ``s = q k^T`` and ``acc += p v`` on the tensor cores (wgmma) for its 64 rows,
with the softmax in the log2 domain (the logit scale folded with log2(e), one FMA per
element). A step's key tile is awaited while the previous step's ``p v`` product runs.

Masks: keys that never count (padding, the rule's column part, other-block extras folded by
the wrapper) carry ``-inf`` in the BIAS row and cost one add. Query-dependent masks (causal,
window) are evaluated on a tile with ``core.key_mask`` only where they can matter: for a
causal block (rows in original order, as ``local.py`` builds them) the key tiles before the
CTA's first row are unmasked, the tiles crossing its rows are masked, and later ones are not
visited at all.

Rows through an index (``Problem.q_gathered``, ``Problem.kv_gathered``; the LSH pieces): the
kernel reads the sorted rows of q, or of the diagonal keys and values, straight from the
sequence-major sources, by 16-byte asynchronous copies (``rows.py``) instead of a sorted copy
made beforehand. Each compute warpgroup copies its own 64 query rows, with the indices of its
tiles fetched two tiles ahead; the memory warpgroup copies the key and value rows of a step, with
the indices of a tile's block fetched a tile ahead. Such copies complete row barriers (raw
ones on a GPU) that every step completes once, so a wait knows its phase from the step count.
"""

import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from hyperattention_jax.kernels.mosaic_gpu import common
from hyperattention_jax.kernels.mosaic_gpu import rows as row_copies
from hyperattention_jax.kernels.mosaic_gpu.common import COL, NEG_BIG, ROW, col_vec, row_vec
from hyperattention_jax.kernels.mosaic_gpu.layout import BIAS, ROWS_PER_WG, Operands, Problem

LN2 = math.log(2.0)


def smem_bytes(prob: Problem, tiles: common.Tiles, buffers: int = 1) -> int:
  """Shared memory of the forward kernel with ``buffers`` query (and output) buffers."""
  item = prob.dtype.itemsize
  nw, s, tk = tiles.compute_wgs, tiles.num_stages, tiles.key_tile
  total = buffers * nw * ROWS_PER_WG * prob.dk * item          # q
  if prob.dk != prob.dv:
    total += buffers * nw * ROWS_PER_WG * prob.dv * item       # o
  total += s * tk * (prob.dk + prob.dv) * item                 # k, v ring
  total += s * prob.meta_rows * tk * 4 + buffers * nw * ROWS_PER_WG * 4 * 3
  if prob.q_gathered:  # row indices of two tiles, raw barriers
    total += 2 * nw * ROWS_PER_WG * 4 + buffers * nw * 8
  if prob.kv_gathered:  # key indices of two tiles' blocks, raw barriers
    total += 2 * prob.block_k * 4 + 2 * s * 8
  return total


def forward(ops: Operands, prob: Problem, tiles: common.Tiles, *, interpret=None):
  """Runs the forward kernel.

  Args:
    ops: the call in the kernels' layout (``layout.prepare``).
    prob: its static description.
    tiles: tile sizes.
    interpret: ``plgpu.InterpretGPUParams`` to run on the CPU interpreter, or None.

  Returns:
    ``o [B, Hq, Nq, dv]`` (``[B, Nq, Hq, dv]`` sequence-major) in the input dtype and
    ``lse [B, Hq, Nq]`` float32 (natural log).
  """
  cta_rows = tiles.rows_per_cta
  tiles_per_block = prob.block_q // cta_rows
  span = tiles.span(prob.num_blocks * tiles_per_block)  # query tiles per CTA
  nbuf = min(span, 2)                   # query/output buffers: the next tile's load overlaps
  common.check_smem(smem_bytes(prob, tiles, nbuf), "the forward kernel")
  nw, rows, tk, stages = tiles.compute_wgs, ROWS_PER_WG, tiles.key_tile, tiles.num_stages
  spec = prob.spec
  dtype = prob.dtype
  f32 = jnp.float32
  needs_pos = prob.needs_positions
  ping_pong = nw == 2
  gathered = prob.q_gathered  # q is rows [R, dk] read through ops["q_rows"]
  kv_gathered = prob.kv_gathered  # k, v are rows read through ops["k_rows"]
  q_raw_barriers = nbuf * nw if gathered else 0  # row barriers: q buffers, then k and v slots
  num_row_barriers = q_raw_barriers + 2 * stages * kv_gathered
  raw = interpret is None  # raw row copies and barriers (the interpreter: Pallas ones)

  def kernel(q_ref, k_ref, v_ref, kmeta_ref, xk_ref, xv_ref, xmeta_ref, qpos_ref, coef_ref,
             dlive_ref, xlive_ref, *rest):
    # The index operands, when gathered: [q_rows] and / or [k_rows].
    *index_refs, o_ref, lse_ref, buffers, barriers = rest
    qrows_ref = index_refs[0] if gathered else None
    krows_ref = index_refs[-1] if kv_gathered else None
    (q_smem, o_smem, k_smem, v_smem, meta_smem, qpos_smem, coef_smem, lse_smem, index_smem,
     k_index_smem, rows_mem) = buffers
    (q_bar, k_bar, v_bar, k_free, v_free, turn, index_bar, k_index_bar, rows_pallas,
     scratch) = barriers
    rows_bar = row_copies.RowBarriers(rows_mem, rows_pallas)
    q_scratch, k_scratch, v_scratch = scratch or (None, None, None)
    views = lambda ref: ref if raw else (ref, None)  # (tiled, raw) views of a buffer
    q_raw = k_raw = v_raw = None
    if gathered:
      q_smem, q_raw = views(q_smem)
    key_rows = None
    if kv_gathered:
      (k_smem, k_raw), (v_smem, v_raw) = views(k_smem), views(v_smem)
      key_rows = common.KeyRows(krows_ref, k_index_smem, k_index_bar, (k_raw, v_raw), rows_bar,
                                q_raw_barriers, stages, (k_scratch, v_scratch))
    if num_row_barriers:
      row_copies.init_barriers(rows_bar)

    def wait_keys(step, which):
      """Waits for operand ``which`` (0: k and meta, 1: v) of the ring's ``step``-th step."""
      slot = lax.rem(step, stages)
      plgpu.barrier_wait((k_bar, v_bar)[which].at[slot])
      if kv_gathered:
        row_copies.wait(rows_bar, key_rows.barrier(slot, which),
                        lax.rem(lax.div(step, stages), 2))

    def tile_of(t):  # the CTA's t-th query tile
      return common.cta_tile(common.axis("tile"), t, span, tiles_per_block,
                             balance=spec.causal)

    def cta_of(t):
      return common.query_cta(prob, tiles, dlive_ref, xlive_ref, tile=tile_of(t))

    head, batch, wg = common.axis("head"), common.axis("batch"), common.axis("wg")

    def take_turn():  # the two compute warpgroups alternate softmax and tensor-core work
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg == nw)
    def _memory():
      common.split_registers(True, nw)
      common.stream_keys(cta_of, span, prob, tiles, (k_ref, v_ref, kmeta_ref),
                         (xk_ref, xv_ref, xmeta_ref), (k_smem, v_smem, meta_smem),
                         (k_bar, v_bar), (k_free, v_free), key_rows)

    @pl.when(wg < nw)
    def _compute():
      common.split_registers(False, nw)

      def rows_of(t):
        return pl.ds(tile_of(t) * cta_rows + wg * rows, rows)

      def load_index(t):  # tile t's row indices, into index buffer t % 2
        which = lax.rem(t, 2)
        plgpu.copy_gmem_to_smem(qrows_ref.at[batch, head, rows_of(t)],
                                index_smem.at[which, wg], index_bar.at[which * nw + wg])

      def load_queries(t):
        buf = lax.rem(t, nbuf)
        bar = q_bar.at[buf * nw + wg]
        if gathered:  # row by row through the indices, then the indices of tile t + 2
          which = lax.rem(t, 2)
          plgpu.barrier_wait(index_bar.at[which * nw + wg])
          dst = (q_smem.at[buf, wg], None if q_raw is None else q_raw.at[buf, wg])
          row_copies.copy_rows(q_ref, index_smem.at[which, wg], dst, rows_bar, buf * nw + wg,
                               num_rows=rows, dim=prob.dk, itemsize=dtype.itemsize,
                               scratch=None if q_scratch is None else q_scratch.at[wg])
          pl.when(t + 2 < span)(lambda: load_index(t + 2))
        else:
          plgpu.copy_gmem_to_smem(prob.rows_of(q_ref, batch, head, rows_of(t)),
                                  q_smem.at[buf, wg], bar)
        plgpu.copy_gmem_to_smem(coef_ref.at[0, pl.ds(0, rows)], coef_smem.at[buf, wg], bar)
        if needs_pos:
          plgpu.copy_gmem_to_smem(qpos_ref.at[batch, head, rows_of(t)], qpos_smem.at[buf, wg],
                                  bar)

      def run_tile(t, offset):
        """Tile ``t``, whose key steps start at ring step ``offset``: its key steps, then its
        output, stored while the next tile runs. Returns the next tile's first step."""
        cta, buf = cta_of(t), lax.rem(t, nbuf)
        q_tile = q_smem.at[buf, wg]
        plgpu.barrier_wait(q_bar.at[buf * nw + wg])
        if gathered:  # the (t // nbuf)-th use of the buffer's raw barrier
          row_copies.wait(rows_bar, buf * nw + wg, lax.rem(lax.div(t, nbuf), 2))
        coef = plgpu.load(coef_smem.at[buf, wg], layout=ROW)
        q_pos = plgpu.load(qpos_smem.at[buf, wg], layout=ROW) if needs_pos else None

        def step_fn(step, carry, *, extra, masked):
          acc, run_max, run_sum = carry
          slot = lax.rem(offset + step, stages)
          k_tile, v_tile, meta, width = common.key_slot(prob, tiles, (k_smem, v_smem, meta_smem),
                                                        slot, extra=extra)
          shape = (rows, width)

          s = common.matmul(q_tile, k_tile, shape, interpret=interpret,
                            transpose_b=True, before_wait=take_turn if ping_pong else None)
          bias = plgpu.load(meta.at[BIAS], layout=COL)
          if extra and prob.exclude_in_kernel:  # a shared sample in this block was counted
            key_block = plgpu.load(meta.at[prob.block_row], layout=COL)
            bias = jnp.where(key_block == cta.block.astype(f32), -jnp.inf, bias)
          k_pos = plgpu.load(meta.at[prob.pos_row], layout=COL) if masked else None
          plgpu.barrier_arrive(k_free.at[slot])

          s = s * row_vec(coef, shape) + col_vec(bias, shape)
          if masked:
            rule = spec.extra_keys if extra else spec.diagonal_keys
            keep = common.query_key_mask(row_vec(q_pos, shape), col_vec(k_pos, shape), rule,
                                         spec)
            s = jnp.where(keep, s, -jnp.inf)
          new_max = jnp.maximum(run_max, s.max(axis=1))
          alpha = jnp.exp2(run_max - new_max)
          p = jnp.exp2(s - row_vec(new_max, shape))
          acc = acc * row_vec(alpha, acc.shape)
          run_sum = run_sum * alpha + p.sum(axis=1)
          p = p.astype(dtype)
          # The softmax is complete before the turn is handed over to the other warpgroup.
          acc, run_sum, new_max, p = lax.optimization_barrier((acc, run_sum, new_max, p))
          if ping_pong:
            plgpu.barrier_arrive(turn)
          wait_keys(offset + step, 1)
          if ping_pong:
            plgpu.barrier_wait(turn)

          def wait_next_keys():  # while the tensor cores run p v
            has_next = step + 1 < cta.num_steps
            pl.when(has_next)(lambda: wait_keys(offset + step + 1, 0))

          acc = common.matmul_acc(acc, p, v_tile, interpret=interpret, before_wait=wait_next_keys)
          plgpu.barrier_arrive(v_free.at[slot])
          return acc, new_max, run_sum

        pl.when(cta.num_steps > 0)(lambda: wait_keys(offset, 0))
        carry = (common.zeros((rows, prob.dv)), common.full((rows,), NEG_BIG, ROW),
                 common.full((rows,), 0.0, ROW))
        acc, run_max, run_sum = common.walk_key_steps(step_fn, carry, cta, prob, tiles)

        nonempty = run_sum > 0
        if spec.causal:  # a query without a position (padding) sees no key
          nonempty = nonempty & (q_pos >= 0)
        safe_sum = jnp.where(nonempty, run_sum, 1.0)
        inv = jnp.where(nonempty, 1.0 / safe_sum, 0.0)
        lse = jnp.where(nonempty, (run_max + jnp.log2(safe_sum)) * LN2, -jnp.inf)
        out_tile = o_smem.at[buf, wg] if o_smem is not None else q_tile
        out_tile[...] = (acc * row_vec(inv, acc.shape)).astype(dtype)
        lse_smem.at[buf, wg][...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_tile, prob.rows_of(o_ref, batch, head, rows_of(t)))
        plgpu.copy_smem_to_gmem(lse_smem.at[buf, wg], lse_ref.at[batch, head, rows_of(t)])
        return offset + cta.num_steps

      def next_tile(t, offset):
        @pl.when(t + 1 < span)
        def _load_next():
          # The buffer may still hold tile t + 1 - nbuf's output, being stored.
          pl.when(t + 1 >= nbuf)(lambda: plgpu.wait_smem_to_gmem(0, wait_read_only=True))
          load_queries(t + 1)

        return run_tile(t, offset)

      if gathered:
        load_index(0)
        pl.when(span > 1)(lambda: load_index(1))
      load_queries(0)
      if ping_pong:
        pl.when(wg == 1)(take_turn)
      lax.fori_loop(0, span, next_tile, jnp.int32(0))
      if ping_pong:
        pl.when(wg == 0)(take_turn)
      plgpu.wait_smem_to_gmem(0)

  transforms = common.smem_transforms(dtype)
  q_tiles = plgpu.SMEM((nbuf, nw, rows, prob.dk), dtype, transforms=transforms)
  buffers = (
      plgpu.RefUnion(q_tiles, row_copies.raw_view((nbuf, nw, rows, prob.dk), dtype))
      if gathered and raw else q_tiles,
      None if prob.dk == prob.dv else plgpu.SMEM((nbuf, nw, rows, prob.dv), dtype,
                                                  transforms=transforms),
      *(plgpu.RefUnion(ring, row_copies.raw_view((stages, tk, dim), dtype))
        if kv_gathered and raw else ring
        for ring, dim in ((plgpu.SMEM((stages, tk, d), dtype, transforms=transforms), d)
                          for d in (prob.dk, prob.dv))),
      plgpu.SMEM((stages, prob.meta_rows, tk), f32),
      plgpu.SMEM((nbuf, nw, rows), f32) if needs_pos else None,
      plgpu.SMEM((nbuf, nw, rows), f32),
      plgpu.SMEM((nbuf, nw, rows), f32),
      plgpu.SMEM((2, nw, rows), jnp.int32) if gathered else None,        # query row indices
      plgpu.SMEM((2, prob.block_k), jnp.int32) if kv_gathered else None,  # key row indices
      row_copies.barrier_memory(num_row_barriers) if num_row_barriers and raw else None,
  )
  barriers = (
      # q (unless gathered: then its raw barrier), coef (, positions)
      plgpu.Barrier(num_arrivals=2 - gathered + needs_pos, num_barriers=nbuf * nw),
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),           # k and its meta
      plgpu.Barrier(num_barriers=stages),                           # v
      plgpu.Barrier(num_arrivals=nw, num_barriers=stages),          # k slot free
      plgpu.Barrier(num_arrivals=nw, num_barriers=stages),          # v slot free
      plgpu.Barrier(num_arrivals=2) if ping_pong else None,         # compute turn
      plgpu.Barrier(num_barriers=2 * nw) if gathered else None,     # query row indices
      plgpu.Barrier(num_arrivals=common.index_chunks(prob), num_barriers=2)
      if kv_gathered else None,                                     # key row indices
      # The interpreter's row barriers, and its barriers for the q, k and v row copies.
      plgpu.Barrier(num_barriers=num_row_barriers) if num_row_barriers and not raw else None,
      (row_copies.scratch_barrier(rows, prob.dk, num_barriers=nw),
       row_copies.scratch_barrier(tk, prob.dk),
       row_copies.scratch_barrier(tk, prob.dv)) if num_row_barriers and not raw else None,
  )

  out_type = (jax.ShapeDtypeStruct(prob.rows_shape(prob.q_heads, prob.q_len, prob.dv), dtype),
              jax.ShapeDtypeStruct((prob.batch, prob.q_heads, prob.q_len), f32))
  return common.launch(
      kernel, buffers=buffers, barriers=barriers, out_type=out_type,
      grid=(prob.num_blocks * tiles_per_block // span, prob.q_heads, prob.batch), compute_wgs=nw,
      interpret=interpret,
  )(ops["q"], ops["k"], ops["v"], ops["k_meta"], ops["extra_k"], ops["extra_v"],
    ops["extra_meta"], ops["q_pos"], ops["coef"], ops["diag_live"], ops["extra_live"],
    *([ops["q_rows"]] if gathered else []), *([ops["k_rows"]] if kv_gathered else []))
