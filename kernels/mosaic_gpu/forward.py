"""Forward kernel: one online softmax per query tile over its key stream.

A CTA owns ``compute_wgs * 64`` query rows of one logical block, one query head and one batch
row. Its key stream is the diagonal key block (in ``key_tile`` steps) followed by the extra
keys of its set. A memory warpgroup streams k, v and the key meta rows through a
``num_stages``-deep ring of shared-memory buffers with bulk copies; each compute warpgroup
runs ``s = q k^T`` and ``acc += p v`` on the tensor cores (wgmma) for its 64 rows, with the
softmax in the log2 domain (the logit scale folded with log2(e), one FMA per element).

Masks: keys that never count (padding, the rule's column part, other-block extras folded by
the wrapper) carry ``-inf`` in the BIAS row and cost one add. Query-dependent masks (causal,
window) are evaluated on a tile with ``core.key_mask`` only where they can matter: for a
causal block (rows in original order, as ``local.py`` builds them) the key tiles before the
CTA's first row are unmasked, the tiles crossing its rows are masked, and later ones are not
visited at all.
"""

import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from hyperattention_jax.kernels.mosaic_gpu import common
from hyperattention_jax.kernels.mosaic_gpu.common import COL, NEG_BIG, ROW, col_vec, row_vec
from hyperattention_jax.kernels.mosaic_gpu.layout import BIAS, ROWS_PER_WG, Operands, Problem

LN2 = math.log(2.0)


def smem_bytes(prob: Problem, tiles: common.Tiles) -> int:
  item = prob.dtype.itemsize
  nw, s, tk = tiles.compute_wgs, tiles.num_stages, tiles.key_tile
  total = nw * ROWS_PER_WG * prob.dk * item                    # q
  if prob.dk != prob.dv:
    total += nw * ROWS_PER_WG * prob.dv * item                 # o
  total += s * tk * (prob.dk + prob.dv) * item                 # k, v ring
  total += s * prob.meta_rows * tk * 4 + nw * ROWS_PER_WG * 4 * 3
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
  common.check_smem(smem_bytes(prob, tiles), "the forward kernel")
  nw, rows, tk, stages = tiles.compute_wgs, ROWS_PER_WG, tiles.key_tile, tiles.num_stages
  cta_rows = tiles.rows_per_cta
  ctas_per_block = prob.block_q // cta_rows
  spec = prob.spec
  dtype = prob.dtype
  f32 = jnp.float32
  needs_pos = prob.needs_positions
  ping_pong = nw == 2

  def kernel(q_ref, k_ref, v_ref, kmeta_ref, xk_ref, xv_ref, xmeta_ref, qpos_ref, coef_ref,
             dlive_ref, xlive_ref, o_ref, lse_ref, buffers, barriers):
    q_smem, o_smem, k_smem, v_smem, meta_smem, qpos_smem, coef_smem, lse_smem = buffers
    q_bar, k_bar, v_bar, k_free, v_free, turn = barriers
    cta = common.query_cta(prob, tiles, dlive_ref, xlive_ref)
    tile, head, batch, wg, block = cta.tile, cta.head, cta.batch, cta.wg, cta.block

    def take_turn():  # the two compute warpgroups alternate softmax and tensor-core work
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg == nw)
    def _memory():
      common.split_registers(True, nw)
      common.stream_keys(cta, prob, tiles, (k_ref, v_ref, kmeta_ref), (xk_ref, xv_ref, xmeta_ref),
                         (k_smem, v_smem, meta_smem), (k_bar, v_bar), (k_free, v_free))

    @pl.when(wg < nw)
    def _compute():
      common.split_registers(False, nw)
      rows_here = pl.ds(tile * cta_rows + wg * rows, rows)
      q_tile = q_smem.at[wg]
      plgpu.copy_gmem_to_smem(prob.rows_of(q_ref, batch, head, rows_here), q_tile, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(coef_ref.at[0, pl.ds(0, rows)], coef_smem.at[wg], q_bar.at[wg])
      if needs_pos:
        plgpu.copy_gmem_to_smem(qpos_ref.at[batch, head, rows_here], qpos_smem.at[wg],
                                q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      coef = plgpu.load(coef_smem.at[wg], layout=ROW)
      q_pos = plgpu.load(qpos_smem.at[wg], layout=ROW) if needs_pos else None
      shape = (rows, tk)

      def step_fn(step, carry, *, extra, masked):
        acc, run_max, run_sum = carry
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(k_bar.at[slot])

        s = common.matmul(q_tile, k_smem.at[slot], shape, interpret=interpret, transpose_b=True,
                          before_wait=take_turn if ping_pong else None)
        meta = meta_smem.at[slot]
        bias = plgpu.load(meta.at[BIAS], layout=COL)
        if extra and prob.exclude_in_kernel:  # a shared sample in this block was counted already
          key_block = plgpu.load(meta.at[prob.block_row], layout=COL)
          bias = jnp.where(key_block == block.astype(f32), -jnp.inf, bias)
        k_pos = plgpu.load(meta.at[prob.pos_row], layout=COL) if masked else None
        plgpu.barrier_arrive(k_free.at[slot])

        s = s * row_vec(coef, shape) + col_vec(bias, shape)
        if masked:
          rule = spec.extra_keys if extra else spec.diagonal_keys
          keep = common.query_key_mask(row_vec(q_pos, shape), col_vec(k_pos, shape), rule, spec)
          s = jnp.where(keep, s, -jnp.inf)
        new_max = jnp.maximum(run_max, s.max(axis=1))
        alpha = jnp.exp2(run_max - new_max)
        p = jnp.exp2(s - row_vec(new_max, shape))
        run_sum = run_sum * alpha + p.sum(axis=1)
        acc = acc * row_vec(alpha, acc.shape)
        p = p.astype(dtype)
        if ping_pong:
          plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(v_bar.at[slot])
        if ping_pong:
          plgpu.barrier_wait(turn)
        acc = common.matmul_acc(acc, p, v_smem.at[slot], interpret=interpret)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, new_max, run_sum

      carry = (common.zeros((rows, prob.dv)), common.full((rows,), NEG_BIG, ROW),
               common.full((rows,), 0.0, ROW))
      if ping_pong:
        pl.when(wg == 1)(take_turn)
      carry = common.walk_key_steps(step_fn, carry, cta, prob, tiles)
      if ping_pong:
        pl.when(wg == 0)(take_turn)
      acc, run_max, run_sum = carry

      nonempty = run_sum > 0
      if spec.causal:  # a query without a position (padding) sees no key
        nonempty = nonempty & (q_pos >= 0)
      safe_sum = jnp.where(nonempty, run_sum, 1.0)
      inv = jnp.where(nonempty, 1.0 / safe_sum, 0.0)
      lse = jnp.where(nonempty, (run_max + jnp.log2(safe_sum)) * LN2, -jnp.inf)
      out_tile = o_smem.at[wg] if o_smem is not None else q_tile
      out_tile[...] = (acc * row_vec(inv, acc.shape)).astype(dtype)
      lse_smem.at[wg][...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(out_tile, prob.rows_of(o_ref, batch, head, rows_here))
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, rows_here])
      plgpu.wait_smem_to_gmem(0)

  transforms = common.smem_transforms(dtype)
  buffers = (
      plgpu.SMEM((nw, rows, prob.dk), dtype, transforms=transforms),
      None if prob.dk == prob.dv else plgpu.SMEM((nw, rows, prob.dv), dtype,
                                                  transforms=transforms),
      plgpu.SMEM((stages, tk, prob.dk), dtype, transforms=transforms),
      plgpu.SMEM((stages, tk, prob.dv), dtype, transforms=transforms),
      plgpu.SMEM((stages, prob.meta_rows, tk), f32),
      plgpu.SMEM((nw, rows), f32) if needs_pos else None,
      plgpu.SMEM((nw, rows), f32),
      plgpu.SMEM((nw, rows), f32),
  )
  barriers = (
      plgpu.Barrier(num_arrivals=2 + needs_pos, num_barriers=nw),   # q, coef (, positions)
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),           # k and its meta
      plgpu.Barrier(num_barriers=stages),                           # v
      plgpu.Barrier(num_arrivals=nw, num_barriers=stages),          # k slot free
      plgpu.Barrier(num_arrivals=nw, num_barriers=stages),          # v slot free
      plgpu.Barrier(num_arrivals=2) if ping_pong else None,         # compute turn
  )

  out_type = (jax.ShapeDtypeStruct(prob.rows_shape(prob.q_heads, prob.q_len, prob.dv), dtype),
              jax.ShapeDtypeStruct((prob.batch, prob.q_heads, prob.q_len), f32))
  return common.launch(
      kernel, buffers=buffers, barriers=barriers, out_type=out_type,
      grid=(prob.num_blocks * ctas_per_block, prob.q_heads, prob.batch), compute_wgs=nw,
      interpret=interpret,
  )(ops["q"], ops["k"], ops["v"], ops["k_meta"], ops["extra_k"], ops["extra_v"],
    ops["extra_meta"], ops["q_pos"], ops["coef"], ops["diag_live"], ops["extra_live"])
