"""Rows read through an index inside a kernel: 16-byte asynchronous copies from every thread.

The LSH pieces read q (and k, v) in sorted order. Instead of an XLA gather that writes a
sorted copy, a kernel copies each row straight from the sequence-major source into its
shared-memory tile, already in wgmma's 128-byte-swizzled layout: the raw
``(rows / 8, d / 64, 8, 64)`` view of the tile, where 16-byte piece ``p`` of row ``r``'s
half-row lands at ``16 * (p ^ (r % 8))`` (``benchmarks/bench_row_copies.py`` checks the
result against ``jnp.take`` on a GPU, bit for bit).

Every thread of the issuing warpgroup starts some of the tile's ``cp.async`` copies (16
bytes each; consecutive threads take consecutive pieces of a row, so reads coalesce) and then
arrives on the tile's barrier once those copies have landed (``cp.async.mbarrier.arrive``,
one arrival per thread). On Hopper this moves random rows faster than bulk (TMA) copies of
one half-row each, which the tensor-memory unit issues too slowly at 128 bytes; Pallas'
``plgpu.copy_gmem_to_smem`` is slower still (it synchronises the warpgroup per copy). The
copies are raw Mosaic GPU code (``plgpu.inline_mgpu``), so their barriers are raw too (a
Pallas barrier cannot be handed to raw code): a ``uint64`` shared array set up by
``init_barriers`` before the warpgroups split, each barrier expecting one arrival per thread
of a warpgroup, awaited with an explicit parity (``wait``; the ``u``-th completion of a
barrier has parity ``u % 2``). The copies write through the generic proxy, so ``wait`` fences
before wgmma or a bulk store reads the tile.

In the CPU interpreter (which runs neither raw code nor swizzles) the same calls copy row by
row with ``plgpu.copy_gmem_to_smem`` into the tiled view and use Pallas barriers, so the
kernels' index and barrier logic is tested there too; ``RowBarriers`` holds one kind or the
other. The interpreter's sources carry a zero row at the end, and indices past it read it.
"""

from typing import Any, NamedTuple

import jax.experimental.pallas as pl

import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith
from jax._src.lib.mlir.dialects import llvm
from jax._src.lib.mlir.dialects import memref
from jax.experimental.mosaic.gpu import utils as mgpu_utils

HALF = 64                       # columns per swizzled half-row (16-bit dtypes: 128 bytes)
SWIZZLE = 128                   # bytes per swizzled half-row
CHUNK = 16                      # bytes per copy
WARPGROUP = 128                 # threads that issue a tile's copies: one barrier arrival each
_SCALAR = plgpu.Layout.WGMMA    # placeholder type of scalar arguments (ignored for 0-d values)


class RowBarriers(NamedTuple):
  """Barriers that a warpgroup's row copies complete (``WARPGROUP`` raw arrivals, or one Pallas
  arrival).

  Attributes:
    raw: on a GPU, the raw barriers' shared memory (``barrier_memory``); else None.
    pallas: in the interpreter, a Pallas barrier array in their place; else None.
  """

  raw: Any
  pallas: Any


def raw_view(shape, dtype):
  """The raw ``(*lead, rows / 8, d / HALF, 8, HALF)`` view of swizzled ``(*lead, rows, d)``
  tiles, as ``plgpu.SMEM``; allocate it in a ``plgpu.RefUnion`` with the tiled view."""
  *lead, rows, dim = shape
  return plgpu.SMEM((*lead, rows // 8, dim // HALF, 8, HALF), dtype,
                    transforms=(plgpu.SwizzleTransform(SWIZZLE),))


def barrier_memory(num_barriers: int):
  """Shared memory for ``num_barriers`` raw barriers."""
  return plgpu.SMEM((num_barriers,), jnp.uint64)


def _value(x):
  """A scalar argument as an MLIR value (raw code receives it as a splat array)."""
  return x.registers.item() if hasattr(x, "registers") else x


def _index(x):
  index = ir.IndexType.get()
  x = _value(x)
  return x if x.type == index else arith.index_cast(index, x)


def _barriers(mem) -> mgpu_utils.BarrierRef:
  """A view of already initialised raw barriers (the phase register is unused: waits take
  an explicit parity)."""
  i32 = ir.IntegerType.get_signless(32)
  phases = memref.alloca(ir.MemRefType.get((), i32), [], [])
  num = ir.MemRefType(mem.type).shape[0]
  return mgpu_utils.BarrierRef(mgpu_utils.memref_ptr(mem), mgpu_utils.c(0, i32), phases, num)


def init_barriers(barriers: RowBarriers):
  """Initialises the raw barriers (one arrival per thread of a warpgroup) for the whole CTA;
  Pallas barriers need nothing. Call it from every thread of the CTA before the warpgroups take
  their branches.
  """
  if barriers.raw is None:
    return

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
  def _init(ctx, mem):
    del ctx
    mgpu_utils.BarrierRef.initialize(mem, arrival_count=WARPGROUP)
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "fence.mbarrier_init.release.cluster;",
                    "", has_side_effects=True)
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "bar.sync 0;", "", has_side_effects=True)

  _init(barriers.raw)


class _I32:
  """An i32 value of raw code with the integer operators ``piece_offset`` uses."""

  def __init__(self, value):
    self.value = value

  @staticmethod
  def _of(x):
    return x.value if isinstance(x, _I32) else mgpu_utils.c(x, ir.IntegerType.get_signless(32))

  def __floordiv__(self, other):
    return _I32(arith.divui(self.value, self._of(other)))

  def __mod__(self, other):
    return _I32(arith.remui(self.value, self._of(other)))

  def __mul__(self, other):
    return _I32(arith.muli(self.value, self._of(other)))

  def __add__(self, other):
    return _I32(arith.addi(self.value, self._of(other)))

  def __xor__(self, other):
    return _I32(arith.xori(self.value, self._of(other)))


def piece_offset(r, piece, dim: int):
  """Byte offset of 16-byte piece ``piece`` of row ``r`` in a tile of ``dim`` 16-bit columns
  in wgmma's 128-byte-swizzled layout: 8-row groups of ``dim / HALF`` half-rows of 128 bytes,
  piece ``p`` of a half-row at ``16 * (p ^ (r % 8))`` (the pattern XORs address bits 4-6 with
  bits 7-9, so it holds from a tile start aligned to 1024 bytes: Pallas aligns shared-memory
  buffers so, and the tiles in them span whole multiples of 1024 bytes). ``r`` and ``piece``
  are ints, numpy arrays, or the raw code's i32 values."""
  per_swizzle = SWIZZLE // CHUNK
  r8 = r % 8
  atom = (r // 8) * (dim // HALF) + piece // per_swizzle
  return atom * (8 * SWIZZLE) + r8 * SWIZZLE + ((piece % per_swizzle) ^ r8) * CHUNK


def scratch_barrier(num_rows: int, dim: int, num_barriers: int = 1):
  """The interpreter's barrier(s) for the copies of one ``copy_rows`` call (one arrival per
  half-row)."""
  return plgpu.Barrier(num_arrivals=num_rows * (dim // HALF), num_barriers=num_barriers)


def copy_rows(src_ref, index_ref, dst, barriers: RowBarriers, barrier, *, num_rows: int,
              dim: int, itemsize: int, scratch=None):
  """Starts the copies of ``num_rows`` rows of ``src_ref`` into one tile, from one warpgroup.

  Args:
    src_ref: ``[R, dim]`` rows in GMEM; an index at or past ``R`` reads zeros (the
      interpreter's last row, zero, instead).
    index_ref: ``[num_rows]`` int32 row indices in SMEM.
    dst: the tile's views ``(tiled [num_rows, dim], raw [num_rows / 8, dim / HALF, 8, HALF])``
      (``raw_view``; the interpreter has the tiled one only).
    barriers, barrier: the barrier (an int32 scalar index) that completes when the rows are in.
    num_rows, dim, itemsize: the tile's shape and the element size in bytes.
    scratch: in the interpreter, a ``scratch_barrier(num_rows, dim)`` for the copies
      themselves (they are awaited here).
  """
  halves = dim // HALF
  tiled_ref, dst_ref = dst
  if barriers.raw is None:
    last = src_ref.shape[0] - 1

    @pl.loop(0, num_rows)
    def _row(r):
      row = jnp.minimum(index_ref[r], last)
      for h in range(halves):
        columns = pl.ds(h * HALF, HALF)
        plgpu.copy_gmem_to_smem(src_ref.at[pl.ds(row, 1), columns],
                                tiled_ref.at[pl.ds(r, 1), columns], scratch)

    plgpu.barrier_wait(scratch)
    plgpu.barrier_arrive(barriers.pallas.at[barrier])
    return
  chunks = dim * itemsize // CHUNK          # 16-byte pieces of a row
  copies = num_rows * chunks
  per_thread = -(-copies // WARPGROUP)
  row_bytes = dim * itemsize

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(),
                                plgpu.RefType((plgpu.SwizzleTransform(SWIZZLE),)),
                                plgpu.RefType(), _SCALAR))
  def _copy(ctx, src, idx, dst, mem, which):
    del ctx
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    index = ir.IndexType.get()
    c = lambda v: mgpu_utils.c(v, i32)
    num_src = ir.MemRefType(src.type).shape[0]
    src_base = llvm.ptrtoint(i64, mgpu_utils.memref_ptr(src))
    dst_base = llvm.ptrtoint(i32, mgpu_utils.memref_ptr(dst))
    tid = arith.remui(arith.index_cast(i32, _index(mgpu_utils.thread_idx())), c(WARPGROUP))
    for j in range(per_thread):
      # Consecutive threads take consecutive pieces of a row: the reads coalesce.
      copy = arith.addi(tid, c(j * WARPGROUP))
      r, piece = arith.divui(copy, c(chunks)), arith.remui(copy, c(chunks))
      row = memref.load(idx, [arith.index_cast(index, arith.minui(r, c(num_rows - 1)))])
      valid = arith.cmpi(arith.CmpIPredicate.ult, row, c(num_src))
      if copies % WARPGROUP:
        valid = arith.andi(valid, arith.cmpi(arith.CmpIPredicate.ult, copy, c(copies)))
      row = arith.select(valid, row, c(0))
      # In 64 bits: a source may hold more than 4 GiB.
      src_addr = arith.addi(src_base, arith.addi(
          arith.muli(arith.extui(i64, row), mgpu_utils.c(row_bytes, i64)),
          arith.extui(i64, arith.muli(piece, c(CHUNK)))))
      dst_addr = arith.addi(dst_base, piece_offset(_I32(r), _I32(piece), dim).value)
      size = arith.select(valid, c(CHUNK), c(0))  # zeros past the source's rows
      mgpu_utils.inline_ptx(
          "{ .reg .u64 g; cvta.to.global.u64 g, $1; "
          f"cp.async.cg.shared.global [$0], [g], {CHUNK}, $2; }}", dst_addr, src_addr, size)
    bar = llvm.ptrtoint(i32, _barriers(mem)[_index(which)].get_ptr())
    mgpu_utils.inline_ptx("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [$0];", bar)

  _copy(src_ref, index_ref, dst_ref, barriers.raw, barrier)


def arrive(barriers: RowBarriers, barrier):
  """The warpgroup's arrivals (no copies) on barrier ``barrier``: a step whose data came
  another way still completes the barrier's phase."""
  if barriers.raw is None:
    plgpu.barrier_arrive(barriers.pallas.at[barrier])
    return

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), _SCALAR))
  def _arrive(ctx, mem, which):
    del ctx
    _barriers(mem)[_index(which)].arrive(
        arrival_count=WARPGROUP,
        predicate=mgpu_utils.single_thread_predicate(mgpu_utils.ThreadSubset.WARPGROUP))

  _arrive(barriers.raw, barrier)


def wait(barriers: RowBarriers, barrier, parity):
  """Waits for barrier ``barrier`` (int32 scalar) to complete the phase of ``parity`` (Pallas
  barriers track their phase themselves)."""
  if barriers.raw is None:
    plgpu.barrier_wait(barriers.pallas.at[barrier])
    return

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), _SCALAR, _SCALAR))
  def _wait(ctx, mem, which, par):
    del ctx
    i1 = ir.IntegerType.get_signless(1)
    _barriers(mem)[_index(which)].wait_parity(arith.trunci(i1, _value(par)))
    # The rows were written by the generic proxy; wgmma and bulk stores read them through
    # the async proxy.
    mgpu_utils.inline_ptx("fence.proxy.async.shared::cta;")

  _wait(barriers.raw, barrier, parity)
