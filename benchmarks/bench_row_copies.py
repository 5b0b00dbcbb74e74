r"""Row gathers into a swizzled shared-memory tile (Hopper), against jnp.take.

The LSH pieces read q, k and v in sorted order through an index. This script checks and times
the ways a kernel can gather such rows itself: each CTA copies 128 rows ``x[perm[i]]`` (128
columns of a 16-bit dtype) straight into one shared-memory tile in its 128-byte-swizzled wgmma
layout (the raw ``(16, 2, 8, 64)`` view of the tile), and then stores the tile. The output must
equal ``jnp.take(x, perm, axis=0)`` bit for bit, which shows that the copies land where wgmma
expects them. Two ways of issuing the copies are timed:

* ``pallas``: ``plgpu.copy_gmem_to_smem`` (a bulk copy) per 64-column half-row, from one
  thread of each of ``--warpgroups`` warpgroups (each copy also arrives on the barrier from the
  warpgroup);
* ``raw``: the kernels' own row copies (``kernels/mosaic_gpu/rows.py``): 16-byte ``cp.async``
  copies from every thread of the warpgroup, each thread arriving once on a raw barrier.

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

from hyperattention_jax.kernels.mosaic_gpu import common
from hyperattention_jax.kernels.mosaic_gpu import rows as row_copies

from benchmarks.timing import median_ms

_ROWS = flags.DEFINE_integer("rows", 2097152, "Rows of x (a multiple of 128).")
_WARPGROUPS = flags.DEFINE_list("warpgroups", ["1", "2", "4"],
                                "Issuing warpgroups per CTA to try (pallas).")
_REPS = flags.DEFINE_integer("reps", 10, "Timing samples.")

TILE = 128      # rows per CTA
COLS = 128      # columns of x
HALF = row_copies.HALF   # columns per copy: 128 bytes, the swizzle width


def _tile_views(dtype):
  """The tile as wgmma reads it, and its raw (TILE / 8, COLS / HALF, 8, HALF) view."""
  tiled = plgpu.SMEM((TILE, COLS), dtype, transforms=common.smem_transforms(dtype))
  return plgpu.RefUnion(tiled, row_copies.raw_view((TILE, COLS), dtype))


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


def gather_raw(x, perm):
  """``x[perm]`` by the kernels' raw copies (``kernels/mosaic_gpu/rows.py``): every thread of
  the warpgroup issues some and arrives once on the tile's raw barrier."""

  def body(x_ref, perm_ref, o_ref):
    tile = lax.axis_index("t")

    def scoped(views, idx_smem, barrier_mem, idx_bar):
      barriers = row_copies.RowBarriers(barrier_mem, None)
      row_copies.init_barriers(barriers)
      plgpu.copy_gmem_to_smem(perm_ref.at[pl.ds(tile * TILE, TILE)], idx_smem, idx_bar)
      plgpu.barrier_wait(idx_bar)
      row_copies.copy_rows(x_ref, idx_smem, views, barriers, jnp.int32(0), num_rows=TILE,
                           dim=COLS, itemsize=x.dtype.itemsize)
      row_copies.wait(barriers, jnp.int32(0), jnp.int32(0))
      plgpu.copy_smem_to_gmem(views[0], o_ref.at[pl.ds(tile * TILE, TILE)])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, _tile_views(x.dtype), plgpu.SMEM((TILE,), jnp.int32),
                  row_copies.barrier_memory(1), plgpu.Barrier())

  return plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
                      grid=(x.shape[0] // TILE,), grid_names=("t",))(x, perm)


def variants():
  yield "jnp.take", lambda x, p: jnp.take(x, p, axis=0)
  for wgs in map(int, _WARPGROUPS.value):
    yield f"pallas copies, {wgs} warpgroup(s)", functools.partial(gather_pallas, warpgroups=wgs)
  yield "raw copies (kernels/mosaic_gpu/rows.py)", gather_raw


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
