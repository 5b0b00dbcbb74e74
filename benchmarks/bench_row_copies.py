r"""Row gathers by bulk copies into a swizzled shared-memory tile (Hopper), against jnp.take.

The LSH pieces read q, k and v in sorted order; today XLA gathers a sorted copy first. This
script measures whether a kernel could gather the rows itself: each CTA copies 128 rows
``x[perm[i]]`` (128 columns of a 16-bit dtype) into one shared-memory tile with one bulk copy
per 64-column half-row, straight into the tile's 128-byte-swizzled wgmma layout (the raw
``(16, 2, 8, 64)`` view of the tile), and then stores the tile. The output must equal
``jnp.take(x, perm, axis=0)`` bit for bit, which shows that single-row copies land where
wgmma expects them. Two ways of issuing the copies are timed:

* ``pallas``: ``plgpu.copy_gmem_to_smem`` per half-row, from one thread of each of
  ``--warpgroups`` warpgroups (each copy also arrives on the barrier from the warpgroup);
* ``raw``: Mosaic GPU copies issued inside ``plgpu.inline_mgpu`` from every thread of the
  warpgroup (``--rows_per_thread`` rows each), with one expected-bytes arrival per tile on a
  barrier that the raw code initialises and awaits itself.

Needs a Hopper GPU:

  PYTHONPATH=. python3 benchmarks/bench_row_copies.py --rows=2097152
"""

import functools

from absl import app
from absl import flags
import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith
from jax._src.lib.mlir.dialects import llvm
from jax._src.lib.mlir.dialects import memref
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from benchmarks.timing import median_ms

_ROWS = flags.DEFINE_integer("rows", 2097152, "Rows of x (a multiple of 128).")
_WARPGROUPS = flags.DEFINE_list("warpgroups", ["1", "2", "4"],
                                "Issuing warpgroups per CTA to try (pallas).")
_ROWS_PER_THREAD = flags.DEFINE_list("rows_per_thread", ["1", "4", "16", "128"],
                                     "Rows per issuing thread to try (raw).")
_REPS = flags.DEFINE_integer("reps", 10, "Timing samples.")

TILE = 128      # rows per CTA
COLS = 128      # columns of x
HALF = 64       # columns per copy: 128 bytes, the swizzle width


def _tile_views(dtype):
  """The tile as wgmma reads it, and its raw (TILE / 8, COLS / HALF, 8, HALF) view."""
  tiled = plgpu.SMEM((TILE, COLS), dtype, transforms=(plgpu.TilingTransform((8, HALF)),
                                                      plgpu.SwizzleTransform(128)))
  raw = plgpu.SMEM((TILE // 8, COLS // HALF, 8, HALF), dtype,
                   transforms=(plgpu.SwizzleTransform(128),))
  return plgpu.RefUnion(tiled, raw)


def gather_pallas(x, perm, *, warpgroups: int):
  """``x[perm]`` by ``plgpu.copy_gmem_to_smem`` per half-row."""
  rows_per_wg = TILE // warpgroups

  def body(x_ref, perm_ref, o_ref):
    tile, wg = lax.axis_index("t"), lax.axis_index("wg")

    def scoped(views, idx_smem, bar, idx_bar, done):
      tiled, raw = views
      first = wg * rows_per_wg
      plgpu.copy_gmem_to_smem(perm_ref.at[pl.ds(tile * TILE + first, rows_per_wg)],
                              idx_smem.at[wg], idx_bar.at[wg])
      plgpu.barrier_wait(idx_bar.at[wg])

      @pl.loop(0, rows_per_wg)
      def _row(i):
        r, row = first + i, idx_smem[wg, i]
        for h in range(COLS // HALF):
          plgpu.copy_gmem_to_smem(x_ref.at[pl.ds(row, 1), pl.ds(h * HALF, HALF)],
                                  raw.at[r // 8, h, pl.ds(r % 8, 1)], bar)

      plgpu.barrier_wait(bar)

      @pl.when(wg == 0)
      def _store():
        plgpu.copy_smem_to_gmem(tiled, o_ref.at[pl.ds(tile * TILE, TILE)])
        plgpu.wait_smem_to_gmem(0)

      plgpu.barrier_arrive(done)
      plgpu.barrier_wait(done)

    pl.run_scoped(scoped, _tile_views(x.dtype), plgpu.SMEM((warpgroups, rows_per_wg), jnp.int32),
                  plgpu.Barrier(num_arrivals=TILE * (COLS // HALF)),
                  plgpu.Barrier(num_barriers=warpgroups), plgpu.Barrier(num_arrivals=warpgroups),
                  collective_axes="wg")

  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                      grid=(x.shape[0] // TILE,), grid_names=("t",), num_threads=warpgroups,
                      thread_name="wg")(x, perm)


def gather_raw(x, perm, *, rows_per_thread: int):
  """``x[perm]`` by raw Mosaic GPU copies from ``TILE / rows_per_thread`` threads."""
  threads = TILE // rows_per_thread
  tile_bytes = TILE * COLS * x.dtype.itemsize

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType((plgpu.SwizzleTransform(128),)),
                                plgpu.RefType(), plgpu.RefType()))
  def copy_rows(ctx, x_gmem, raw, idx, barrier_mem):
    index = ir.IndexType.get()
    c = mgpu_utils.c
    barrier = mgpu_utils.BarrierRef.initialize(barrier_mem, arrival_count=1)
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "fence.mbarrier_init.release.cluster;", "",
                    has_side_effects=True)
    mgpu_utils.warpgroup_barrier()
    tid = arith.index_cast(index, mgpu_utils.thread_idx())
    active = arith.cmpi(arith.CmpIPredicate.ult, tid, c(threads, index))
    for j in range(rows_per_thread):
      r = arith.select(active, arith.addi(arith.muli(tid, c(rows_per_thread, index)), c(j, index)),
                       c(0, index))
      row = arith.index_cast(index, memref.load(idx, [r]))
      group, in_group = arith.divui(r, c(8, index)), arith.remui(r, c(8, index))
      for h in range(COLS // HALF):
        ctx.async_copy(src_ref=x_gmem,
                       dst_ref=mgpu_utils.memref_slice(raw, (group, h,
                                                             mgpu_utils.ds(in_group, 1))),
                       gmem_slice=(mgpu_utils.ds(row, 1), mgpu_utils.ds(h * HALF, HALF)),
                       swizzle=128, barrier=barrier, arrive=False, predicate=active)
    barrier.arrive_expect_tx(tile_bytes, predicate=mgpu_utils.single_thread_predicate(
        mgpu_utils.ThreadSubset.WARPGROUP))
    barrier.wait()

  def body(x_ref, perm_ref, o_ref):
    tile = lax.axis_index("t")

    def scoped(views, idx_smem, barrier_mem, idx_bar):
      tiled, raw = views
      plgpu.copy_gmem_to_smem(perm_ref.at[pl.ds(tile * TILE, TILE)], idx_smem, idx_bar)
      plgpu.barrier_wait(idx_bar)
      copy_rows(x_ref, raw, idx_smem, barrier_mem)
      plgpu.copy_smem_to_gmem(tiled, o_ref.at[pl.ds(tile * TILE, TILE)])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, _tile_views(x.dtype), plgpu.SMEM((TILE,), jnp.int32),
                  plgpu.SMEM((1,), jnp.uint64), plgpu.Barrier())

  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                      grid=(x.shape[0] // TILE,), grid_names=("t",))(x, perm)


def variants():
  yield "jnp.take", lambda x, p: jnp.take(x, p, axis=0)
  for wgs in map(int, _WARPGROUPS.value):
    yield f"pallas copies, {wgs} warpgroup(s)", functools.partial(gather_pallas, warpgroups=wgs)
  for rpt in map(int, _ROWS_PER_THREAD.value):
    yield f"raw copies, {rpt} row(s) per thread", functools.partial(gather_raw,
                                                                     rows_per_thread=rpt)


def main(argv):
  del argv
  n = _ROWS.value
  if n % TILE:
    raise ValueError(f"--rows={n} must be a multiple of {TILE}.")
  kx, kp = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (n, COLS), jnp.float32).astype(jnp.bfloat16)
  perm = jax.random.permutation(kp, n).astype(jnp.int32)
  expected = jnp.take(x, perm, axis=0)
  moved = 2 * x.size * x.dtype.itemsize      # read and written once
  print(f"jax {jax.__version__}; {jax.devices()[0].device_kind}; {n} rows of {COLS} bf16",
        flush=True)
  for name, fn in variants():
    fn = jax.jit(fn)
    try:
      equal = bool(jnp.array_equal(fn(x, perm), expected))
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name}: ERROR {type(e).__name__}: {str(e)[:600]}", flush=True)
      continue
    ms = median_ms(fn, x, perm, reps=_REPS.value, warmup=1, queued=4)
    print(f"{name}: equal to jnp.take: {equal}; {ms:.3f} ms ({moved / ms / 1e9:.2f} TB/s)",
          flush=True)


if __name__ == "__main__":
  app.run(main)
