"""Pieces shared by the Mosaic GPU kernels.

Tile sizes, smem transforms, masks and matmul helpers; the launch of a warp-specialised
kernel and the producer loop of its memory warpgroup; and, for the key-streaming kernels
(forward, dq), a CTA's indices, its key steps and the walk over them.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from hyperattention_jax import core
from hyperattention_jax.kernels.mosaic_gpu import rows as row_copies
from hyperattention_jax.kernels.mosaic_gpu.layout import (ROWS_PER_WG, Problem, round_up,
                                                       unsupported)

# A finite "minus infinity" for running maxima: a row that has seen no counted key keeps it,
# so exp2(old_max - new_max) stays finite (1) instead of exp2(-inf + inf) = nan.
NEG_BIG = -1e30

WGMMA = plgpu.Layout.WGMMA
ROW = plgpu.Layout.WGMMA.reduce(1)   # one value per row of a [64, n] wgmma tile
COL = plgpu.Layout.WGMMA.reduce(0)   # one value per column


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes of the kernels.

  Attributes:
    key_tile: keys per pipeline step of the forward and dq kernels.
    query_tile: query rows per pipeline step of the dk/dv kernel.
    num_stages: pipeline depth (buffers per streamed operand).
    compute_wgs: compute warpgroups per CTA (each owns ``ROWS_PER_WG`` rows or keys).
    tiles_per_cta: query tiles (of ``rows_per_cta`` rows) that a forward CTA runs one after
      another, its key stream running on from one to the next, so that the next tile's
      queries load and the previous tile's output is stored while the tensor cores work
      (the forward kernel only; a CTA's tiles may belong to different blocks).
  """

  key_tile: int
  query_tile: int = 64
  num_stages: int = 2
  compute_wgs: int = 2
  tiles_per_cta: int = 1

  def __post_init__(self):
    for name in ("key_tile", "query_tile"):
      value = getattr(self, name)
      if value % 64 or value <= 0:
        raise ValueError(f"{name}={value} must be a positive multiple of 64.")
    if self.num_stages < 2:
      raise ValueError(f"num_stages={self.num_stages} must be at least 2.")
    if self.compute_wgs not in (1, 2):
      raise ValueError(f"compute_wgs={self.compute_wgs} must be 1 or 2.")
    if self.tiles_per_cta < 1:
      raise ValueError(f"tiles_per_cta={self.tiles_per_cta} must be at least 1.")

  @property
  def rows_per_cta(self) -> int:
    return self.compute_wgs * ROWS_PER_WG

  def span(self, num_tiles: int) -> int:
    """Query tiles per CTA: the largest divisor of ``num_tiles`` (a call's query tiles per
    head and batch row) up to ``tiles_per_cta``."""
    return max(t for t in range(1, min(self.tiles_per_cta, num_tiles) + 1)
               if num_tiles % t == 0)


def forward_tiles(dk: int, dv: int, causal: bool = False) -> Tiles:
  """Tiles of the forward kernel: 128-key steps, with several query tiles per CTA (sixteen for
  the LSH pieces, whose tiles have few key steps each; two for causal blocks, whose CTAs'
  work grows with their tiles' rows); 64-key steps and one query tile per CTA for 256-wide
  heads (shared memory)."""
  if max(dk, dv) > 128:
    return Tiles(key_tile=64)
  return Tiles(key_tile=128, tiles_per_cta=2 if causal else 16)


def dq_tiles(dk: int, dv: int) -> Tiles:
  return Tiles(key_tile=64, compute_wgs=1 if max(dk, dv) > 128 else 2)


def dkv_tiles(dk: int, dv: int) -> Tiles:
  return Tiles(key_tile=64, query_tile=64, compute_wgs=1 if max(dk, dv) > 128 else 2)


def smem_transforms(dtype):
  """Tiling and 128-byte swizzle of a [rows, 64k] 16-bit operand, as wgmma reads it."""
  swizzle = 128
  elems = swizzle // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle))


def row_vec(x, shape):
  return lax.broadcast_in_dim(x, shape, [0])


def col_vec(x, shape):
  return lax.broadcast_in_dim(x, shape, [1])


def query_key_mask(row_pos, col_pos, rule: str, spec: core.BlockSpec):
  """``core.key_mask`` on a tile: row (query) and column (key) positions broadcast."""
  return core.key_mask(row_pos, col_pos, rule, spec)


def _is_ref(x) -> bool:
  return hasattr(x, "transforms") or hasattr(getattr(x, "aval", None), "inner_aval")


def _operand(x, transpose: bool):
  return x.transpose((1, 0)) if transpose else x


def matmul(a, b, shape, *, interpret, transpose_b=False, before_wait=None):
  """``a @ b`` (``b.T`` with ``transpose_b``) into a fresh float32 accumulator of ``shape``.

  ``a`` is a shared-memory ref or a 16-bit value in registers, ``b`` a shared-memory ref.
  ``before_wait`` runs between issuing the product and waiting for it. The CPU
  interpreter's wgmma takes shared-memory operands only, so there the product is an
  ordinary dot of the loaded values (same inputs, float32 accumulation).
  """
  if interpret:
    if before_wait is not None:
      before_wait()
    a_val = a[...] if _is_ref(a) else a
    b_val = _operand(b[...], transpose_b)
    return lax.dot(a_val, b_val, preferred_element_type=jnp.float32)

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, _operand(b, transpose_b))
    if before_wait is not None:
      before_wait()
    return acc_ref[...]

  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def matmuls(products, *, interpret):
  """Several products issued together, with one wait: the tensor cores run them back to back.

  Args:
    products: ``(acc, a, b, transpose_b)`` tuples; ``acc`` is a float32 accumulator value to
      add to, or a shape for a fresh one; ``a`` and ``b`` as ``matmul``.

  Returns:
    The accumulators, in the order of ``products``.
  """
  def fresh(acc):
    return isinstance(acc, tuple)

  if interpret:
    return tuple(
        (0 if fresh(acc) else acc)
        + matmul(a, b, acc if fresh(acc) else acc.shape, interpret=True, transpose_b=t)
        for acc, a, b, t in products)

  def body(acc_refs):
    for acc_ref, (_, a, b, t) in zip(acc_refs, products):
      plgpu.wgmma(acc_ref, a, _operand(b, t))

  inits = tuple(plgpu.ACC.init(zeros(acc) if fresh(acc) else acc) for acc, *_ in products)
  return pl.run_state(body)(inits)


def matmul_acc(acc, a, b, *, interpret, transpose_b=False, before_wait=None):
  """``acc + a @ b`` for a float32 accumulator value (accumulated in place on the GPU);
  ``before_wait`` as ``matmul``."""
  if interpret:
    return acc + matmul(a, b, acc.shape, interpret=True, transpose_b=transpose_b,
                        before_wait=before_wait)

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, _operand(b, transpose_b))
    if before_wait is not None:
      before_wait()

  return pl.run_state(body)(plgpu.ACC.init(acc))


def check_smem(total_bytes: int, what: str):
  # Hopper gives a CTA at most 227 KiB of shared memory.
  if total_bytes > 227 * 1024:
    raise unsupported(f"{what} needs {total_bytes} bytes of shared memory.")


def zeros(shape, layout=WGMMA):
  return plgpu.layout_cast(jnp.full(shape, 0, jnp.float32), layout)


def full(shape, value, layout):
  return plgpu.layout_cast(jnp.full(shape, value, jnp.float32), layout)


def split_registers(memory: bool, compute_wgs: int):
  """Moves registers from the memory warpgroup to the compute warpgroups (two of them).

  Three warpgroups share 64K registers, 168 per thread by default; the compute warpgroups'
  accumulators need more (232 each, leaving 40 to the memory warpgroup). With one compute
  warpgroup each thread may use 255 already.
  """
  if compute_wgs == 2:
    if memory:
      plgpu.set_max_registers(40, action="decrease")
    else:
      plgpu.set_max_registers(232, action="increase")


def compiler_params(interpret):
  del interpret
  return plgpu.CompilerParams(approx_math=True)


def axis(name):
  return lax.axis_index(name)


def launch(kernel, *, buffers, barriers, out_type, grid, compute_wgs: int, interpret):
  """A warp-specialised ``plgpu.kernel`` over a ``(tile, head, batch)`` grid.

  Each CTA runs ``compute_wgs`` compute warpgroups and one memory warpgroup (``wg`` ==
  ``compute_wgs``), which share the scoped ``buffers`` and ``barriers``.

  Args:
    kernel: ``kernel(*refs, buffers, barriers)``, where ``refs`` are the operands' and
      outputs' GMEM refs.
    buffers, barriers: shared-memory and barrier allocations (``pl.run_scoped`` pytrees).
    out_type, grid, interpret: as ``plgpu.kernel``.
    compute_wgs: compute warpgroups per CTA.

  Returns:
    The kernel, to call on its operands.
  """
  def entry(*refs):
    pl.run_scoped(lambda buf, bar: kernel(*refs, buf, bar), buffers, barriers,
                  collective_axes="wg")

  return plgpu.kernel(
      entry, out_type=out_type, grid=grid, grid_names=("tile", "head", "batch"),
      num_threads=compute_wgs + 1, thread_name="wg",
      compiler_params=compiler_params(interpret), interpret=interpret)


def key_steps(prob: Problem, tiles: Tiles, first_row, diag_live, extra_live):
  """Key-tile counts of a query CTA whose first row in its block is ``first_row``.

  Args:
    diag_live, extra_live: leading keys of the CTA's diagonal block and extra set that may
      count (``layout.operands``); tiles after them are skipped.

  Returns ``(num_unmasked, num_diagonal, num_steps)``: diagonal tiles ``[0, num_unmasked)``
  need no query-dependent mask, ``[num_unmasked, num_diagonal)`` need one; steps
  ``[num_diagonal, num_steps)`` are extra-key tiles.
  """
  tk = tiles.key_tile
  num_diagonal = (diag_live + tk - 1) // tk
  if prob.spec.causal:
    # Keys at block index <= the CTA's last row; tiles wholly before its first row are full.
    last = first_row + tiles.rows_per_cta - 1
    num_diagonal = jnp.minimum(last // tk + 1, num_diagonal)
    num_unmasked = 0 if prob.spec.window_size > 0 else jnp.minimum(first_row // tk,
                                                                   num_diagonal)
  else:
    num_unmasked = 0 if prob.spec.window_size > 0 else num_diagonal
  num_extra = (extra_live + tk - 1) // tk if prob.num_extra else 0
  return num_unmasked, num_diagonal, num_diagonal + num_extra


def cta_tile(cta, t, span: int, tiles_per_block: int, *, balance: bool):
  """The query tile that CTA ``cta`` runs ``t``-th (of ``span``).

  A CTA runs ``span`` consecutive tiles; with ``balance`` (causal blocks, where a tile's
  work grows with its rows), an even ``span`` that divides ``tiles_per_block`` pairs low
  rows with high ones instead: the ``G`` CTAs of a block take its tiles ``c, 2G-1-c, 2G+c,
  4G-1-c, ...`` (``c`` the CTA within the block), so that each has the same work.
  """
  if not (balance and span % 2 == 0 and tiles_per_block % span == 0):
    return cta * span + t
  groups = tiles_per_block // span
  block, c = cta // groups, cta % groups
  first_of_pair = (t // 2) * 2 * groups
  local = jnp.where(t % 2 == 0, first_of_pair + c, first_of_pair + 2 * groups - 1 - c)
  return block * tiles_per_block + local


class QueryCta(NamedTuple):
  """What a CTA of the key-streaming kernels (forward, dq) works on.

  Attributes:
    tile, head, batch: its grid indices (query tile, query head, batch row).
    wg: the warpgroup running (``compute_wgs``: the memory warpgroup).
    block: the logical block of its query rows.
    first_row: the first of its rows within the block.
    kv_head: the key head its query head reads.
    set_idx: the extra key set its block reads.
    num_unmasked, num_diagonal, num_steps: its key steps (``key_steps``).
  """

  tile: Any
  head: Any
  batch: Any
  wg: Any
  block: Any
  first_row: Any
  kv_head: Any
  set_idx: Any
  num_unmasked: Any
  num_diagonal: Any
  num_steps: Any


def query_cta(prob: Problem, tiles: Tiles, dlive_ref, xlive_ref, tile=None) -> QueryCta:
  """The ``QueryCta`` of a query tile, from the grid and the live-key counts in GMEM.

  Args:
    dlive_ref, xlive_ref: the ``diag_live`` and ``extra_live`` operands (``layout.Operands``).
    tile: the query tile (of ``tiles.rows_per_cta`` rows); the grid's tile index if None.
  """
  ctas_per_block = prob.block_q // tiles.rows_per_cta
  head, batch = axis("head"), axis("batch")
  tile = axis("tile") if tile is None else tile
  wg = axis("wg")
  block = tile // ctas_per_block
  first_row = (tile % ctas_per_block) * tiles.rows_per_cta
  kv_head = head // prob.groups
  set_idx = block if prob.num_sets > 1 else 0
  num_unmasked, num_diagonal, num_steps = key_steps(
      prob, tiles, first_row, dlive_ref[batch, kv_head, block],
      xlive_ref[batch, kv_head, set_idx])
  return QueryCta(tile, head, batch, wg, block, first_row, kv_head, set_idx, num_unmasked,
                  num_diagonal, num_steps)


def extra_step_keys(prob: Problem, tiles: Tiles) -> int:
  """Keys that an extra-key step computes with: the key tile, or, when every extra set fits
  in less (a few sink keys), that many rounded up to 64 (wgmma's reduction granule with the
  128-byte swizzle): the products then skip the padding columns. The ring slot still holds
  a whole key tile; such a set is a single step."""
  width = round_up(max(prob.extra_keys, 1), 64)
  return width if width < tiles.key_tile else tiles.key_tile


def key_slot(prob: Problem, tiles: Tiles, buffers, slot, *, extra: bool):
  """``(k, v, meta, width)``: the refs of ring ``slot`` that a key step reads, and its keys.

  Args:
    buffers: the rings ``k [S, tk, dk]``, ``v [S, tk, dv]``, ``meta [S, R, tk]``.
    extra: whether the step is an extra-key step (it reads ``extra_step_keys`` keys).
  """
  k_smem, v_smem, meta_smem = buffers
  width = extra_step_keys(prob, tiles) if extra else tiles.key_tile
  if width == tiles.key_tile:
    return k_smem.at[slot], v_smem.at[slot], meta_smem.at[slot], width
  keys = pl.ds(0, width)
  return k_smem.at[slot, keys], v_smem.at[slot, keys], meta_smem.at[slot, :, keys], width


def _loop(lower, upper, body, carry):
  if isinstance(lower, int) and isinstance(upper, int) and upper <= lower:
    return carry
  return lax.fori_loop(lower, upper, body, carry)


def walk_key_steps(step_fn, carry, cta: QueryCta, prob: Problem, tiles: Tiles):
  """Folds ``step_fn(step, carry, *, extra, masked)`` over the key steps of a query CTA.

  The unmasked diagonal tiles come first, then those that need the query-dependent mask,
  then the extra-key tiles; each range is one loop with the flags fixed.
  """
  carry = _loop(0, cta.num_unmasked, functools.partial(step_fn, extra=False, masked=False),
                carry)
  if prob.needs_positions:  # otherwise num_unmasked == num_diagonal
    carry = _loop(cta.num_unmasked, cta.num_diagonal,
                  functools.partial(step_fn, extra=False, masked=True), carry)
  if prob.num_extra // tiles.key_tile:
    carry = _loop(cta.num_diagonal, cta.num_steps,
                  functools.partial(step_fn, extra=True, masked=prob.needs_positions), carry)
  return carry


def _feed(fetch, free, *, first, num_steps, stages: int):
  """Steps ``[first, first + num_steps)`` of a ring's stream: ``fetch(i, slot, which)`` for
  the ``i``-th of them, once the slot's earlier contents are released."""
  @pl.loop(0, num_steps)
  def _step(i):
    step = first + i
    slot = lax.rem(step, stages)
    for which in (0, 1):
      pl.when(step >= stages)(lambda: plgpu.barrier_wait(free[which].at[slot]))
      fetch(i, slot, which)


def _drain(free, *, num_steps, stages: int):
  """Observes the last releases too: a barrier's waiter must see each of its phases."""
  @pl.loop(jnp.maximum(num_steps - stages, 0), num_steps)
  def _step(step):
    slot = lax.rem(step, stages)
    for which in (0, 1):
      plgpu.barrier_wait(free[which].at[slot])


def produce(fetch, free, *, num_steps, stages: int):
  """The loop of a memory warpgroup that feeds a ``stages``-deep ring of two operands.

  ``fetch(step, slot, which)`` starts the copies of operand ``which`` (0 or 1) of pipeline
  step ``step`` into ring slot ``slot``; a slot is refilled once its ``free[which]``
  barrier says every compute warpgroup is done with it.
  """
  _feed(fetch, free, first=0, num_steps=num_steps, stages=stages)
  _drain(free, num_steps=num_steps, stages=stages)


def index_chunks(prob: Problem) -> int:
  """Bulk copies that bring a block's key indices (one copy moves at most 256 elements)."""
  return next(prob.block_k // chunk for chunk in (256, 128, 64) if prob.block_k % chunk == 0)


class KeyRows(NamedTuple):
  """What a memory warpgroup needs to bring diagonal keys row by row (``rows.py``).

  Attributes:
    index: ``[B, Hk, Nk]`` int32 in GMEM: the source row of each sorted key.
    index_smem: ``[2, block_k]`` int32: the indices of a tile's block (two tiles in flight).
    index_bar: two barriers for them (``index_chunks`` arrivals each).
    raw: the raw views of the k and v rings (``rows.raw_view``; None in the interpreter).
    barriers: ``rows.RowBarriers``; barrier ``barrier(slot, which)`` completes operand
      ``which`` (0: k, 1: v) of ring slot ``slot``, once per pipeline step.
    first: the first of those barriers (for k; v's follow the k ones).
    num_stages: the ring's slots.
    scratch: the interpreter's barriers for the k and v copies (None on a GPU).
  """

  index: Any
  index_smem: Any
  index_bar: Any
  raw: Any
  barriers: Any
  first: int
  num_stages: int
  scratch: Any

  def barrier(self, slot, which):
    """The index of the row barrier of operand ``which`` of ring slot ``slot``."""
    return self.first + which * self.num_stages + slot


def stream_keys(cta_of, num_tiles: int, prob: Problem, tiles: Tiles, key_refs, extra_refs,
                buffers, ready, free, key_rows: KeyRows | None = None):
  """The memory warpgroup of a key-streaming kernel (forward, dq).

  The key streams of query tiles ``cta_of(0) .. cta_of(num_tiles - 1)`` run one after
  another through one ring. A tile's step ``i < num_diagonal`` brings diagonal key tile
  ``i`` of the tile's block (k, v and meta rows from ``key_refs``); later steps bring extra
  key tiles of its set. k and its meta arrive on ``ready[0]``, v on ``ready[1]``; a slot is
  reused once its ``free`` barriers (k, v) say every compute warpgroup is done with it.

  Args:
    cta_of: the ``query_cta`` of tile ``t`` (a traced index), all of one head and batch row.
    num_tiles: how many.
    prob, tiles: the call and the kernel's tiles.
    key_refs: ``(k [B, Hk, Nk, dk], v [B, Hk, Nk, dv], meta [B, Hk, R, Nk])`` in GMEM (k
      and v sequence-major with ``spec.sequence_major``).
    extra_refs: ``(k [B, Hk, E, M, dk], v [B, Hk, E, M, dv], meta [B, Hk, E, R, M])``;
      unused when there are no extra keys.
    buffers: shared-memory rings ``k [S, tk, dk]``, ``v [S, tk, dv]``, ``meta [S, R, tk]``.
    ready, free: ``(k, v)`` barrier arrays of ``num_stages`` barriers each.
    key_rows: with ``prob.kv_gathered``, how the diagonal keys are read through their index
      (``key_refs``' k and v are then source rows ``[R, d]``); each step also completes the
      raw barriers of its slot.
  """
  k_smem, v_smem, meta_smem = buffers
  key_tile, stages = tiles.key_tile, tiles.num_stages
  has_extra = bool(prob.num_extra // key_tile)

  def fetch_index(t):  # the indices of tile t's diagonal block, in index_chunks(prob) copies
    cta = cta_of(t)
    chunk = prob.block_k // index_chunks(prob)
    for c in range(index_chunks(prob)):
      first = cta.block * prob.block_k + c * chunk
      plgpu.copy_gmem_to_smem(key_rows.index.at[cta.batch, cta.kv_head, pl.ds(first, chunk)],
                              key_rows.index_smem.at[lax.rem(t, 2), pl.ds(c * chunk, chunk)],
                              key_rows.index_bar.at[lax.rem(t, 2)])

  def fetch_of(cta, t, step, slot, which):
    batch, kv_head, num_diagonal = cta.batch, cta.kv_head, cta.num_diagonal
    first_key = cta.block * prob.block_k

    @pl.when(step < num_diagonal)
    def _diagonal():
      keys = pl.ds(first_key + step * key_tile, key_tile)
      if key_rows is None:
        plgpu.copy_gmem_to_smem(prob.rows_of(key_refs[which], batch, kv_head, keys),
                                (k_smem, v_smem)[which].at[slot], ready[which].at[slot])
      else:  # row by row; an arrival stands in for the bulk copy's
        index = key_rows.index_smem.at[lax.rem(t, 2), pl.ds(step * key_tile, key_tile)]
        raw = key_rows.raw[which]
        dst = ((k_smem, v_smem)[which].at[slot], None if raw is None else raw.at[slot])
        row_copies.copy_rows(key_refs[which], index, dst, key_rows.barriers,
                             key_rows.barrier(slot, which), num_rows=key_tile,
                             dim=(prob.dk, prob.dv)[which], itemsize=prob.dtype.itemsize,
                             scratch=key_rows.scratch[which])
        plgpu.barrier_arrive(ready[which].at[slot])
      if which == 0:
        plgpu.copy_gmem_to_smem(key_refs[2].at[batch, kv_head, :, keys], meta_smem.at[slot],
                                ready[0].at[slot])

    if not has_extra:
      return

    @pl.when(step >= num_diagonal)
    def _extra():
      keys = pl.ds((step - num_diagonal) * key_tile, key_tile)
      plgpu.copy_gmem_to_smem(extra_refs[which].at[batch, kv_head, cta.set_idx, keys],
                              (k_smem, v_smem)[which].at[slot], ready[which].at[slot])
      if which == 0:
        plgpu.copy_gmem_to_smem(extra_refs[2].at[batch, kv_head, cta.set_idx, :, keys],
                                meta_smem.at[slot], ready[0].at[slot])
      if key_rows is not None:  # the raw barrier completes on every step
        row_copies.arrive(key_rows.barriers, key_rows.barrier(slot, which))

  def tile_stream(t, first):
    cta = cta_of(t)
    if key_rows is not None:  # this tile's indices are in; fetch the next tile's
      plgpu.barrier_wait(key_rows.index_bar.at[lax.rem(t, 2)])
      pl.when(t + 1 < num_tiles)(lambda: fetch_index(t + 1))
    _feed(functools.partial(fetch_of, cta, t), free, first=first, num_steps=cta.num_steps,
          stages=stages)
    return first + cta.num_steps

  if key_rows is not None:
    fetch_index(0)
  num_steps = lax.fori_loop(0, num_tiles, tile_stream, jnp.int32(0))
  _drain(free, num_steps=num_steps, stages=stages)
