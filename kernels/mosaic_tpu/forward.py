"""Forward Mosaic TPU kernel of the core primitive: ``o`` and ``lse`` per query tile.

Grid ``(batch, kv_head, block, head_pack, q_tile, step)``; only ``step`` is sequential.
A step holds the query tiles of ``heads_per_step`` query heads of one GQA group: they
read the same keys, so each key tile is fetched once for all of them and the steps are
fewer and larger. Steps ``0 .. k_tiles - 1`` walk the block's diagonal key tiles. A
resident extra key set is folded in during the last diagonal step (one DMA per (batch,
kv head) when the set is shared); a streamed one takes one more step per tile. Running
max, sum and output accumulator stay in VMEM across the steps (online softmax).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hyperattention_jax import core
from hyperattention_jax.kernels.mosaic_tpu import common
from hyperattention_jax.kernels.mosaic_tpu.tiling import NUM_LANES, NUM_SUBLANES, TilePlan

# Grid axes of the forward and dq calls: (batch, kv_head, block, head_pack, q_tile, step).
BATCH_AXIS, BLOCK_AXIS, STEP_AXIS = 0, 2, 5


def _online_softmax_step(logits, v, m_ref, l_ref, acc_ref, precision):
  """Folds masked logits ``[tq, t]`` (-inf where a key does not count) and ``v [t, dv]`` in.

  ``m_ref`` and ``l_ref`` hold the running max and sum lane-replicated, ``[tq, 128]``.
  """
  m_prev = m_ref[...]
  m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
  # A row that has counted nothing keeps m = -inf; exponentiating against 0 instead
  # avoids -inf - -inf, and its p and correction come out exactly 0.
  m_base = jnp.where(m_next == -jnp.inf, 0.0, m_next)
  p = jnp.exp(logits - common.lanes(m_base, logits.shape[1]))
  correction = jnp.exp(m_prev - m_base)
  l_ref[...] = correction * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
  m_ref[...] = m_next
  acc_ref[...] = (acc_ref[...] * common.lanes(correction, acc_ref.shape[1])
                  + common.matmul(p.astype(v.dtype), v, common.NN_DIMS, precision))


def for_each_key_tile(step, plan: TilePlan, spec: core.BlockSpec, attend, key_refs, extra_refs,
                      bias_ref, *, batch, block):
  """Runs ``attend`` on the step's key tiles: a diagonal one, then (resident or streamed) extras.

  ``attend(k, v, k_pos, rule, mask_more=None, bias=None)`` folds one tile of keys, given as
  values, into every head of the step; ``mask_more(shape)`` further restricts its mask and
  ``bias`` is added to its logits.

  Args:
    step: the grid's step index.
    plan, spec: the call's tiles and block spec.
    attend: as above.
    key_refs: refs of the diagonal tile's keys, values and position rows.
    extra_refs: refs of the extra keys, values, positions and blocks (unused without
      extra keys).
    bias_ref: the per-batch bias of the extra logits.
    batch, block: the program's batch row and query block.
  """
  k_ref, v_ref, k_pos_ref = key_refs

  @pl.when(step < plan.k_tiles)
  def _diagonal():
    attend(k_ref[...], v_ref[...], common.row(k_pos_ref), spec.diagonal_keys)

  if not plan.has_extra:
    return
  extra_k_ref, extra_v_ref, extra_pos_ref, extra_block_ref = extra_refs

  def chunk(start: int):
    rows = pl.ds(start, plan.extra_chunk)
    k, v = extra_k_ref[rows, :], extra_v_ref[rows, :]
    extra_pos, extra_block = extra_pos_ref[:1, rows], extra_block_ref[:1, rows]
    # Extra keys of the query's own block were already counted as diagonal keys.
    attend(k, v, extra_pos, spec.extra_keys, bias=bias_ref[batch],
           mask_more=lambda shape: jnp.broadcast_to(extra_block, shape) != block)

  if plan.extra_resident:
    @pl.when(step == plan.k_tiles - 1)
    def _resident():
      for start in range(0, plan.extra_padded, plan.extra_chunk):
        chunk(start)
  else:
    pl.when(step >= plan.k_tiles)(lambda: chunk(0))


def _forward_kernel(scale_ref, bias_ref, q_ref, q_pos_ref, k_ref, v_ref, k_pos_ref, *refs,
                    spec: core.BlockSpec, plan: TilePlan, precision):
  extra_refs, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = (
      (refs[:4], refs[4:]) if plan.has_extra else ((), refs))
  batch, block = pl.program_id(BATCH_AXIS), pl.program_id(BLOCK_AXIS)
  step = pl.program_id(STEP_AXIS)
  heads = q_ref.shape[0]
  scale = scale_ref[0]

  @pl.when(step == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def attend(k, v, k_pos, rule, mask_more=None, bias=None):
    """Every head of the step against one key tile (shared by the heads)."""
    for head in range(heads):
      head_pos_ref = q_pos_ref.at[head]

      @pl.when(common.may_count(common.row(head_pos_ref), k_pos, spec.causal))
      def _():
        logits = scale * common.matmul(q_ref[head], k, common.NT_DIMS, precision)
        if bias is not None:
          logits += bias
        keep = common.tile_mask(common.column(head_pos_ref), k_pos, rule, spec, logits.shape)
        if mask_more is not None:
          keep &= mask_more(logits.shape)
        _online_softmax_step(jnp.where(keep, logits, -jnp.inf), v, m_ref.at[head],
                             l_ref.at[head], acc_ref.at[head], precision)

  for_each_key_tile(step, plan, spec, attend, (k_ref, v_ref, k_pos_ref), extra_refs, bias_ref,
                    batch=batch, block=block)

  @pl.when(step == plan.k_tiles + plan.extra_steps - 1)
  def _finish():
    for head in range(heads):
      total = l_ref[head]
      nonempty = total > 0
      safe_total = jnp.where(nonempty, total, 1.0)
      o_ref[head] = (acc_ref[head] * common.lanes(1.0 / safe_total, o_ref.shape[-1])).astype(
          o_ref.dtype)
      lse = jnp.where(nonempty, m_ref[head] + jnp.log(safe_total), -jnp.inf)  # [tq, 128]
      # Transposed, the query rows lie along lanes: a dense (8, tq) block of lse rows.
      lse_ref[head] = lse.T[:NUM_SUBLANES]


class QueryTileMaps:
  """Index maps shared by the forward and dq calls (grid axes above)."""

  def __init__(self, plan: TilePlan, groups: int):
    self.plan = plan
    self.packs = groups // plan.heads_per_step

  def _heads(self, hk, pack):
    """Index of the step's head pack along the query-head axis (in packs)."""
    return hk * self.packs + pack

  def _q_tile_index(self, block, i):
    return block * self.plan.q_tiles + i

  def q_tile(self, b, hk, block, pack, i, step):
    del step
    return b, self._heads(hk, pack), self._q_tile_index(block, i), 0

  def q_rows(self, b, hk, block, pack, i, step):
    del step
    return b, self._heads(hk, pack), 0, self._q_tile_index(block, i)

  def q_stats(self, b, hk, block, pack, i, step):
    del step
    return b, self._heads(hk, pack), self._q_tile_index(block, i), 0, 0

  def _diagonal_tile(self, block, step):
    # During the extra steps the last diagonal tile stays put, so nothing is refetched.
    return block * self.plan.k_tiles + jnp.minimum(step, self.plan.k_tiles - 1)

  def k_tile(self, b, hk, block, pack, i, step):
    del pack, i
    return b, hk, self._diagonal_tile(block, step), 0

  def k_rows(self, b, hk, block, pack, i, step):
    del pack, i
    return b, hk, 0, self._diagonal_tile(block, step)

  def _extra_index(self, block, step):
    extra_set = block if self.plan.num_extra_sets > 1 else 0
    if self.plan.extra_resident:
      # Constant over blocks (shared set), head packs, query tiles and steps: fetched
      # once per (batch, kv head), as the pipeline skips copies of unchanged blocks.
      return extra_set, 0
    return extra_set, jnp.maximum(step - self.plan.k_tiles, 0)

  def extra_tile(self, b, hk, block, pack, i, step):
    del pack, i
    extra_set, tile = self._extra_index(block, step)
    return b, hk, extra_set, tile, 0

  def extra_rows(self, b, hk, block, pack, i, step):
    del pack, i
    extra_set, tile = self._extra_index(block, step)
    return b, hk, extra_set, 0, tile

  def grid(self, batch: int, kv_heads: int):
    plan = self.plan
    return (batch, kv_heads, plan.num_blocks, self.packs, plan.q_tiles,
            plan.k_tiles + plan.extra_steps)

  def query_spec(self, width: int):
    """A ``[B, Hq, nq, width]`` operand (q, dO, o, dq) by query tile."""
    return pl.BlockSpec((None, self.plan.heads_per_step, self.plan.q_tile, width), self.q_tile)

  def query_rows_spec(self):
    """A ``[B, Hq, 8, nq]`` rows operand (positions, lse, delta) by query tile."""
    return pl.BlockSpec((None, self.plan.heads_per_step, NUM_SUBLANES, self.plan.q_tile),
                        self.q_rows)

  def key_specs(self, dk: int, dv: int):
    """Specs of ``k, v, k_rows`` and, with extra keys, ``extra_k, extra_v`` and their rows."""
    plan = self.plan
    specs = [pl.BlockSpec((None, None, plan.k_tile, dk), self.k_tile),
             pl.BlockSpec((None, None, plan.k_tile, dv), self.k_tile),
             pl.BlockSpec((None, None, NUM_SUBLANES, plan.k_tile), self.k_rows)]
    if plan.has_extra:
      rows = (None, None, None, NUM_SUBLANES, plan.extra_block)
      specs += [pl.BlockSpec((None, None, None, plan.extra_block, dk), self.extra_tile),
                pl.BlockSpec((None, None, None, plan.extra_block, dv), self.extra_tile),
                pl.BlockSpec(rows, self.extra_rows), pl.BlockSpec(rows, self.extra_rows)]
    return specs


def compiler_params(num_axes: int, vmem_limit_bytes):
  """Every grid axis but the last is independent; the last carries the accumulators."""
  return pltpu.CompilerParams(
      dimension_semantics=(pltpu.PARALLEL,) * (num_axes - 1) + (pltpu.ARBITRARY,),
      vmem_limit_bytes=vmem_limit_bytes)


def smem_spec():
  return pl.BlockSpec(memory_space=pltpu.SMEM)


def forward(q, k, v, extra_k, extra_v, scale, bias, q_rows, k_rows, extra_rows,
            extra_block_rows, *, spec: core.BlockSpec, plan: TilePlan, vmem_limit_bytes,
            interpret):
  """Runs the forward kernel on the padded layout.

  Args:
    q: ``[B, Hq, nb * padded_q, dk]``; k: ``[B, Hk, nb * padded_k, dk]``; v: ``[.., dv]``.
    extra_k, extra_v: ``[B, Hk, E, extra_padded, d]`` (unused without extra keys).
    scale: ``[1]`` float32; bias: ``[B]`` float32 (added to extra logits).
    q_rows, k_rows: ``[B, H, 8, n]`` int32 positions, sublane-replicated.
    extra_rows, extra_block_rows: ``[B, Hk, E, 8, extra_padded]`` int32.
    spec: the call's ``core.BlockSpec``; plan: its tiles.
    vmem_limit_bytes: Mosaic's scoped VMEM limit, or None.
    interpret: False, or True / ``pltpu.InterpretParams`` to run on CPU.

  Returns:
    ``o [B, Hq, nb * padded_q, dv]`` in q's dtype and ``lse [B, Hq, 8, nb * padded_q]``.
  """
  batch, q_heads, q_len, dk = q.shape
  kv_heads, dv = k.shape[1], v.shape[-1]
  maps = QueryTileMaps(plan, q_heads // kv_heads)
  in_specs = [smem_spec(), smem_spec(), maps.query_spec(dk), maps.query_rows_spec(),
              *maps.key_specs(dk, dv)]
  args = [scale, bias, q, q_rows, k, v, k_rows]
  if plan.has_extra:
    args += [extra_k, extra_v, extra_rows, extra_block_rows]
  state = (plan.heads_per_step, plan.q_tile)
  kernel = functools.partial(_forward_kernel, spec=spec, plan=plan,
                             precision=common.precision_for(q.dtype))
  grid = maps.grid(batch, kv_heads)
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=in_specs,
      out_specs=[maps.query_spec(dv), maps.query_rows_spec()],
      out_shape=[jax.ShapeDtypeStruct((batch, q_heads, q_len, dv), q.dtype),
                 jax.ShapeDtypeStruct((batch, q_heads, NUM_SUBLANES, q_len), jnp.float32)],
      scratch_shapes=[pltpu.VMEM(state + (NUM_LANES,), jnp.float32),
                      pltpu.VMEM(state + (NUM_LANES,), jnp.float32),
                      pltpu.VMEM(state + (dv,), jnp.float32)],
      compiler_params=compiler_params(len(grid), vmem_limit_bytes),
      interpret=interpret,
      name="hyperattention_block_fwd",
  )(*args)
