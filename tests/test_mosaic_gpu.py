"""Tests of the Mosaic GPU kernels of the core primitive.

On the CPU the kernels run in Pallas' GPU interpreter (``plgpu.InterpretGPUParams``), which
simulates the warpgroups, shared memory, bulk copies and barriers (a barrier phase nobody
waits for is an error). Each case runs the forward and the VJP (with an lse cotangent) of
the kernels and of ``core.block_attention`` on fresh random inputs. The lowering test runs
the whole Pallas-to-Mosaic-GPU lowering for a Hopper target (layout inference, wgmma and
bulk-copy checks), which needs no GPU. ``benchmarks/check_mosaic_gpu.py`` repeats the
comparisons at real shapes on a Hopper GPU.
"""

import dataclasses
import functools
import zlib

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np

from hyperattention_jax import api
from hyperattention_jax import core
from hyperattention_jax import lsh
from hyperattention_jax import recursion
from hyperattention_jax.config import HyperAttentionConfig
from hyperattention_jax.exact import positions
from hyperattention_jax.kernels import REGISTRY
from hyperattention_jax.kernels import mosaic_gpu
from hyperattention_jax.kernels.testing import random_inputs
from hyperattention_jax.kernels.mosaic_gpu import common
from hyperattention_jax.kernels.mosaic_gpu import exact
from hyperattention_jax.kernels.mosaic_gpu import layout
from hyperattention_jax.kernels.mosaic_gpu import rows as row_copies

_CASES = (
    # An LSH piece of cross-attention (query and key blocks differ and are not multiples
    # of the tiles): shuffled positions, padding keys, one shared sampled set (not a
    # multiple of the tile either, its dk/dv split in two query ranges) with same-block
    # exclusion and a bias, the sinks left out, GQA, value dim != key dim.
    dict(testcase_name="lsh_piece_bf16_gqa", batch=1, q_heads=2, kv_heads=1, num_blocks=2,
         block_q=100, block_k=120, dk=128, dv=64, num_extra=70, per_block=False,
         dtype=jnp.bfloat16, same_delta=True,
         spec=dict(diagonal_keys=core.NONLOCAL, extra_keys=core.NONLOCAL, sink_size=3)),
    # A causal leaf of 200 rows (two query tiles, padded to 256): the key tile above the
    # diagonal skipped, padding queries (position -1: nothing counts), sinks and window
    # overhang with a query-dependent mask, float16.
    dict(testcase_name="causal_leaf_fp16", batch=1, q_heads=1, kv_heads=1, num_blocks=1,
         block_q=200, block_k=200, dk=64, dv=64, num_extra=20, per_block=True,
         dtype=jnp.float16, causal=True,
         spec=dict(causal=True, extra_keys=core.LOCAL, sink_size=2, window_size=12)),
    # The same two calls with q, k, v and o in the sequence-major layout.
    dict(testcase_name="lsh_piece_bf16_gqa_sequence_major", batch=1, q_heads=2, kv_heads=1,
         num_blocks=2, block_q=100, block_k=120, dk=128, dv=64, num_extra=70, per_block=False,
         dtype=jnp.bfloat16,
         spec=dict(diagonal_keys=core.NONLOCAL, extra_keys=core.NONLOCAL, sink_size=3,
                   sequence_major=True)),
    dict(testcase_name="causal_leaf_fp16_sequence_major", batch=2, q_heads=2, kv_heads=2,
         num_blocks=1, block_q=200, block_k=200, dk=64, dv=64, num_extra=20, per_block=True,
         dtype=jnp.float16, causal=True,
         spec=dict(causal=True, extra_keys=core.LOCAL, sink_size=2, window_size=12,
                   sequence_major=True)),
    # The non-causal exact local part with no window: only the sinks count, so the
    # diagonal tiles of blocks without a sink are skipped; one extra set per block.
    dict(testcase_name="local_sinks_bf16", batch=1, q_heads=1, kv_heads=1, num_blocks=2,
         block_q=64, block_k=64, dk=64, dv=64, num_extra=4, per_block=True,
         dtype=jnp.bfloat16, sinks=True,
         spec=dict(diagonal_keys=core.LOCAL, extra_keys=core.LOCAL, sink_size=4)),
)


def _seed(name: str) -> int:
  return zlib.crc32(name.encode())


_DIFFERENTIABLE = ("q", "k", "v", "extra_k", "extra_v", "extra_bias")


def forward_and_vjp(block_attention, inputs, spec, scale, seed, lse_shift=None):
  """A jitted ``() -> ((o, lse), (grads, d_scale), d_out)`` under random cotangents."""
  fixed = {name: x for name, x in inputs.items() if name not in _DIFFERENTIABLE}
  rng = np.random.default_rng(seed + 1)

  @jax.jit
  def run(diff, scale):
    attend = lambda diff, scale: block_attention(**diff, **fixed, spec=spec, scale=scale)
    (out, lse), vjp = jax.vjp(attend, diff, scale)
    d_out = jnp.asarray(rng.normal(size=out.shape), out.dtype)
    d_lse = jnp.asarray(rng.normal(size=lse.shape), jnp.float32)
    if lse_shift is not None:
      d_lse = d_lse + lse_shift
    return (out, lse), vjp((d_out, d_lse)), d_out

  diff = {name: inputs[name] for name in _DIFFERENTIABLE}
  return functools.partial(run, diff, jnp.float32(scale))


def _relative(x, ref):
  """Error relative to the tensor's scale (gradients are sums of many products)."""
  ref = np.asarray(ref, np.float32)
  return np.asarray(x, np.float32) / (1.0 + np.max(np.abs(ref), initial=0.0)), ref / (
      1.0 + np.max(np.abs(ref), initial=0.0))


class MosaicGpuKernelTest(parameterized.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_matches_reference(self, *, spec, dtype, causal=False, sinks=False, same_delta=False,
                             **shape):
    seed = _seed(self._testMethodName)
    inputs = random_inputs(seed, dtype=dtype, causal=causal, sinks=sinks,
                           sequence_major=spec.get("sequence_major", False), **shape)
    spec = core.BlockSpec(block_q=shape["block_q"], block_k=shape["block_k"], **spec)
    scale = 0.9 / np.sqrt(shape["dk"])
    kernel = functools.partial(mosaic_gpu.block_attention, interpret=plgpu.InterpretGPUParams())
    run = forward_and_vjp(kernel, inputs, spec, scale, seed)
    (out, lse), (grads, d_scale), d_out = run()
    (ref_out, ref_lse), (ref_grads, ref_d_scale), _ = forward_and_vjp(
        core.block_attention, inputs, spec, scale, seed)()

    tol = 2e-2
    chex.assert_trees_all_equal_shapes_and_dtypes((out, lse, grads), (ref_out, ref_lse, ref_grads))
    chex.assert_trees_all_equal(jnp.isfinite(lse), jnp.isfinite(ref_lse))
    self.assertTrue(np.any(np.isfinite(np.asarray(lse))))
    chex.assert_trees_all_close(out, ref_out, atol=tol, rtol=tol)
    chex.assert_trees_all_close(lse, ref_lse, atol=tol, rtol=tol)
    chex.assert_tree_all_finite((grads, d_scale))
    for name in _DIFFERENTIABLE:
      with self.subTest(name):
        chex.assert_trees_all_close(*_relative(grads[name], ref_grads[name]), atol=2 * tol,
                                    rtol=0)
    chex.assert_trees_all_close(d_scale, ref_d_scale, atol=2 * tol * (1 + abs(ref_d_scale)),
                                rtol=0)

    if sinks:  # fixed-order sums only: a second run gives the same bits
      chex.assert_trees_all_equal(((out, lse), (grads, d_scale)), run()[:2])
    if not same_delta:
      return
    # As FlashAttention does, the backward takes delta = rowsum(dO * o) from the stored
    # 16-bit o. Against a reference differentiated with that same delta (its lse cotangent
    # shifted by rowsum(dO * (o_f32 - o))), even the scale and bias gradients, sums over all
    # rows that mostly cancel, agree to float32 rounding.
    upcast = {n: x.astype(jnp.float32) if x.dtype == dtype else x for n, x in inputs.items()}
    out32 = core.block_attention(**upcast, spec=spec, scale=scale)[0]
    shift = jnp.sum(d_out.astype(jnp.float32) * (out32 - out.astype(jnp.float32)), axis=-1)
    (_, _), (same_grads, same_d_scale), _ = forward_and_vjp(
        core.block_attention, inputs, spec, scale, seed, lse_shift=shift)()
    chex.assert_trees_all_close(*_relative(grads["extra_bias"], same_grads["extra_bias"]),
                                atol=1e-4, rtol=0)
    chex.assert_trees_all_close(d_scale, same_d_scale, atol=1e-4 * (1 + abs(same_d_scale)),
                                rtol=0)

  @parameterized.parameters(("q",), ("kv",), ("qkv",))
  def test_sorted_rows_match_reference(self, which):
    """q, or k and v, given as lsh.SortedRows (rows of a larger source, some past its end):
    output, lse and the gradients of the sources match the reference."""
    seed = _seed(self._testMethodName + which)
    # Four query tiles per head: one CTA runs them all, prefetching indices tiles ahead.
    inputs = random_inputs(seed, batch=1, q_heads=2, kv_heads=1, num_blocks=4, block_q=128,
                           block_k=128, dk=64, dv=64, num_extra=64, per_block=False,
                           dtype=jnp.bfloat16)
    spec = core.BlockSpec(block_q=128, block_k=128, extra_keys=core.NONLOCAL,
                          diagonal_keys=core.NONLOCAL)
    rng = np.random.default_rng(seed)

    def sorted_rows(x):  # x's rows taken from a shuffled, larger source
      num_rows = x.size // x.shape[-1]
      source = jnp.asarray(rng.normal(size=(num_rows + 37, x.shape[-1])), x.dtype)
      taken = rng.permutation(source.shape[0])[:num_rows]
      taken[rng.choice(num_rows, 5, replace=False)] = source.shape[0]   # zero rows
      inverse = np.full(source.shape[0], num_rows, np.int32)
      inverse[taken[taken < source.shape[0]]] = np.nonzero(taken < source.shape[0])[0]
      return source, jnp.asarray(taken.reshape(x.shape[:-1]), jnp.int32), jnp.asarray(inverse)

    q_rows = sorted_rows(inputs["q"]) if "q" in which else None
    k_rows = sorted_rows(inputs["k"]) if "kv" in which else None
    v_source = (jnp.asarray(rng.normal(size=k_rows[0].shape), inputs["v"].dtype)
                if k_rows else None)
    diff = dict(q=q_rows[0] if q_rows else inputs["q"], k=k_rows[0] if k_rows else inputs["k"],
                v=v_source if k_rows else inputs["v"])
    fixed = {n: x for n, x in inputs.items() if n not in diff}
    shape = inputs["q"].shape[:-1]
    d_out = jnp.asarray(rng.normal(size=shape + (inputs["v"].shape[-1],)), jnp.bfloat16)
    d_lse = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def run(block_attention):
      def attend(diff):
        q = lsh.SortedRows(diff["q"], *q_rows[1:]) if q_rows else diff["q"]
        k, v = diff["k"], diff["v"]
        if k_rows:
          k, v = (lsh.SortedRows(x, *k_rows[1:]) for x in (k, v))
        return block_attention(q, k, v, **fixed, spec=spec, scale=0.125)
      (out, lse), vjp = jax.vjp(attend, diff)
      return out, lse, vjp((d_out, d_lse))[0]

    kernel = functools.partial(mosaic_gpu.block_attention, interpret=plgpu.InterpretGPUParams())
    out, lse, grads = jax.jit(lambda: run(kernel))()
    ref_out, ref_lse, ref_grads = jax.jit(lambda: run(core.block_attention))()
    tol = 2e-2
    chex.assert_trees_all_close(out, ref_out, atol=tol, rtol=tol)
    chex.assert_trees_all_close(lse, ref_lse, atol=tol, rtol=tol)
    for name in diff:
      with self.subTest(name):
        chex.assert_tree_all_finite(grads[name])
        chex.assert_trees_all_close(*_relative(grads[name], ref_grads[name]), atol=2 * tol,
                                    rtol=0)
    if q_rows:  # source rows that no query takes get no gradient
      untaken = np.setdiff1d(np.arange(q_rows[0].shape[0]), np.asarray(q_rows[1]))
      chex.assert_trees_all_equal(grads["q"][untaken], jnp.zeros_like(grads["q"][untaken]))

  @parameterized.parameters((True, 1, 512), (False, 1, 512), (True, 2, 300))
  def test_lsh_pieces_match_reference(self, causal, batch, n):
    """The LSH pieces end to end (the causal recursion's rectangles too) on the kernels,
    which read the sorted rows through the index: output and input gradients match the
    reference implementation of the primitive (also two batch rows of a length that is not
    a multiple of the block)."""
    seed = _seed(self._testMethodName + str((causal, batch, n)))
    keys = jax.random.split(jax.random.key(seed), 5)
    heads, kv_heads, dim = 2, 1, 64
    query = jax.random.normal(keys[0], (batch, n, heads, dim), jnp.bfloat16)
    key, value = (jax.random.normal(k, (batch, n, kv_heads, dim), jnp.bfloat16)
                  for k in keys[1:3])
    d_out = jax.random.normal(keys[3], query.shape, jnp.float32)
    config = HyperAttentionConfig(block_size=128, sample_size=64, min_seq_len=128)
    attend = recursion.causal_attention if causal else recursion.noncausal_attention
    q_pos, k_pos = positions(batch, heads, n), positions(batch, kv_heads, n)
    projections = lsh.draw_projections(keys[4], dim, config.num_projections)

    def run(block_attention):
      def loss(query, key, value):
        out, _ = attend(query, key, value, q_pos, k_pos, None, sample_rng=keys[4],
                        projections=projections, config=config, scale=dim ** -0.5,
                        block_attention=block_attention)
        return jnp.sum(out.astype(jnp.float32) * d_out), out
      return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(query, key, value)

    kernel = functools.partial(mosaic_gpu.block_attention, interpret=plgpu.InterpretGPUParams())
    grads, out = jax.jit(lambda: run(kernel))()
    ref_grads, ref_out = jax.jit(lambda: run(core.block_attention))()
    tol = 2e-2
    chex.assert_trees_all_close(out, ref_out, atol=tol, rtol=tol)
    for grad, ref in zip(grads, ref_grads):
      chex.assert_tree_all_finite(grad)
      chex.assert_trees_all_close(*_relative(grad, ref), atol=2 * tol, rtol=0)

  def test_other_tiles(self):
    """Tile sizes other than the defaults (as benchmarks/tune_mosaic_gpu.py tries them)."""
    seed = _seed(self._testMethodName)
    inputs = random_inputs(seed, batch=1, q_heads=2, kv_heads=1, num_blocks=2, block_q=128,
                           block_k=128, dk=64, dv=64, num_extra=64, per_block=False,
                           dtype=jnp.bfloat16)
    spec = core.BlockSpec(block_q=128, block_k=128, diagonal_keys=core.NONLOCAL,
                          extra_keys=core.NONLOCAL, sink_size=2)
    tiles = mosaic_gpu.KernelTiles(forward=mosaic_gpu.Tiles(64, 64, 3, 2),
                                   dq=mosaic_gpu.Tiles(128, 64, 3, 2),
                                   dkv=mosaic_gpu.Tiles(64, 64, 3, 1))
    kernel = functools.partial(mosaic_gpu.block_attention, interpret=plgpu.InterpretGPUParams(),
                               tiles=tiles)
    (out, lse), (grads, _), _ = forward_and_vjp(kernel, inputs, spec, 0.125, seed)()
    (ref_out, ref_lse), (ref_grads, _), _ = forward_and_vjp(
        core.block_attention, inputs, spec, 0.125, seed)()
    chex.assert_trees_all_close((out, lse), (ref_out, ref_lse), atol=2e-2, rtol=2e-2)
    for name in _DIFFERENTIABLE:
      with self.subTest(name):
        chex.assert_trees_all_close(*_relative(grads[name], ref_grads[name]), atol=4e-2, rtol=0)

  @parameterized.named_parameters(
      # An LSH piece whose 256-row blocks are two query tiles: a CTA runs both.
      dict(testcase_name="lsh_piece_two_tiles", tiles_per_cta=2, block=256, num_extra=70,
           per_block=False, causal=False, dtype=jnp.bfloat16, sequence_major=False,
           spec=dict(diagonal_keys=core.NONLOCAL, extra_keys=core.NONLOCAL, sink_size=3)),
      # Four tiles per CTA: one CTA runs both blocks of the piece, each with its own
      # same-block exclusion of the samples.
      dict(testcase_name="lsh_piece_across_blocks", tiles_per_cta=4, block=256, num_extra=70,
           per_block=False, causal=False, dtype=jnp.bfloat16, sequence_major=False,
           spec=dict(diagonal_keys=core.NONLOCAL, extra_keys=core.NONLOCAL, sink_size=3)),
      # A causal leaf of three query tiles run by one CTA (its query buffers reused while
      # the first tile's output may still be stored), sequence-major, float16.
      dict(testcase_name="causal_leaf_three_tiles", tiles_per_cta=3, block=384, num_extra=20,
           per_block=True, causal=True, dtype=jnp.float16, sequence_major=True,
           spec=dict(causal=True, extra_keys=core.LOCAL, sink_size=2, window_size=12)),
      # Four tiles of a causal leaf per CTA, balanced: a CTA runs tiles 0, 3, 4, 7 of the
      # piece's two blocks of four tiles, the other 1, 2, 5, 6.
      dict(testcase_name="causal_leaf_balanced", tiles_per_cta=4, block=512, num_extra=4,
           per_block=True, causal=True, dtype=jnp.bfloat16, sequence_major=False,
           spec=dict(causal=True, extra_keys=core.LOCAL, sink_size=4)),
  )
  def test_forward_tiles_per_cta(self, *, tiles_per_cta, block, num_extra, per_block, causal,
                                 dtype, sequence_major, spec):
    """Forward CTAs that run several query tiles one after another."""
    seed = _seed(self._testMethodName)
    inputs = random_inputs(seed, batch=1, q_heads=2, kv_heads=1, num_blocks=2, block_q=block,
                           block_k=block, dk=64, dv=64, num_extra=num_extra,
                           per_block=per_block, dtype=dtype, causal=causal,
                           sequence_major=sequence_major)
    spec = core.BlockSpec(block_q=block, block_k=block, sequence_major=sequence_major, **spec)
    default = mosaic_gpu.default_tiles(64, 64)
    tiles = default._replace(forward=mosaic_gpu.Tiles(128, tiles_per_cta=tiles_per_cta))
    self.assertEqual(tiles.forward.span(2 * block // 128), tiles_per_cta)
    got = mosaic_gpu.block_attention(**inputs, spec=spec, scale=0.125, tiles=tiles,
                                     interpret=plgpu.InterpretGPUParams())
    want = core.block_attention(**inputs, spec=spec, scale=0.125)
    chex.assert_trees_all_equal(jnp.isfinite(got[1]), jnp.isfinite(want[1]))
    chex.assert_trees_all_close(got, want, atol=2e-2, rtol=2e-2)

  def test_cta_tile(self):
    """Balanced causal tiles: every tile run once, and each CTA of a block with equal work."""
    for span, per_block in ((2, 32), (4, 32), (4, 8)):
      ctas = 2 * per_block // span
      got = [[int(common.cta_tile(c, t, span, per_block, balance=True))
              for t in range(span)] for c in range(ctas)]
      self.assertCountEqual(sum(got, []), range(2 * per_block))
      self.assertLen({sum(tile % per_block for tile in tiles) for tiles in got}, 1)
    self.assertEqual([int(common.cta_tile(1, t, 3, 9, balance=True))
                      for t in range(3)], [3, 4, 5])  # an odd span: consecutive tiles

  def test_forward_span(self):
    tiles = mosaic_gpu.Tiles(128, tiles_per_cta=4)
    self.assertEqual([tiles.span(n) for n in (1, 2, 3, 4, 6, 8, 32)], [1, 2, 3, 4, 3, 4, 4])
    with self.assertRaisesRegex(ValueError, "tiles_per_cta=0"):
      mosaic_gpu.Tiles(128, tiles_per_cta=0)

  def test_extra_step_keys(self):
    """A few sink keys take a 64-key extra step; larger extra sets take whole key tiles."""
    def width(num_extra, key_tile):
      q = jnp.zeros((1, 1, 256, 64), jnp.bfloat16)
      prob = layout.describe(q, q, q, jnp.zeros((1, 1, 1, num_extra)),
                             spec=core.BlockSpec(block_q=256, block_k=256), q_multiple=128,
                             k_multiple=128, extra_multiple=128)
      return common.extra_step_keys(prob, mosaic_gpu.Tiles(key_tile))
    self.assertEqual([width(n, 128) for n in (1, 4, 64, 65, 128, 256)],
                     [64, 64, 64, 128, 128, 128])
    self.assertEqual([width(n, 64) for n in (4, 256)], [64, 64])

  def test_forward_without_extras(self):
    """A call with no extra keys at all (an LSH piece that is a single block)."""
    seed = _seed(self._testMethodName)
    inputs = random_inputs(seed, batch=1, q_heads=1, kv_heads=1, num_blocks=1, block_q=128,
                           block_k=128, dk=64, dv=64, num_extra=0, per_block=False,
                           dtype=jnp.bfloat16)
    spec = core.BlockSpec(block_q=128, block_k=128, diagonal_keys=core.NONLOCAL, sink_size=2)
    out = mosaic_gpu.block_attention(**inputs, spec=spec, scale=0.125,
                                     interpret=plgpu.InterpretGPUParams())
    chex.assert_trees_all_close(out, core.block_attention(**inputs, spec=spec, scale=0.125),
                                atol=2e-2, rtol=2e-2)


class MosaicGpuLoweringTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # An LSH piece at the default block and sample sizes, bf16, head_dim 128, GQA.
      dict(testcase_name="lsh_bf16_d128", dtype=jnp.bfloat16, head_dim=128, block=256,
           num_blocks=2, num_extra=256, per_block=False, causal=False, window_size=0),
      # An LSH piece that leaves out a window (the negated window test in the mask).
      dict(testcase_name="lsh_window_bf16_d64", dtype=jnp.bfloat16, head_dim=64, block=128,
           num_blocks=3, num_extra=64, per_block=False, causal=False, window_size=32),
      # Causal leaves with sinks and a window, float16, head_dim 256 (one compute
      # warpgroup in the backward kernels), a leaf that is not a multiple of the tiles.
      dict(testcase_name="leaf_fp16_d256", dtype=jnp.float16, head_dim=256, block=300,
           num_blocks=2, num_extra=40, per_block=True, causal=True, window_size=32),
      # Causal leaves reading and writing the sequence-major layout (strided bulk copies).
      dict(testcase_name="leaf_bf16_d128_sequence_major", dtype=jnp.bfloat16, head_dim=128,
           block=256, num_blocks=2, num_extra=4, per_block=True, causal=True, window_size=0,
           sequence_major=True),
      # Forward CTAs that run one query tile each, or two (an LSH piece, causal leaves).
      dict(testcase_name="lsh_bf16_d128_one_tile", dtype=jnp.bfloat16, head_dim=128,
           block=256, num_blocks=2, num_extra=256, per_block=False, causal=False,
           window_size=0, tiles_per_cta=1),
      dict(testcase_name="lsh_bf16_d128_two_tiles", dtype=jnp.bfloat16, head_dim=128,
           block=256, num_blocks=2, num_extra=256, per_block=False, causal=False,
           window_size=0, tiles_per_cta=2),
      dict(testcase_name="leaf_bf16_d128_two_tiles", dtype=jnp.bfloat16, head_dim=128,
           block=512, num_blocks=2, num_extra=4, per_block=True, causal=True, window_size=0,
           sequence_major=True, tiles_per_cta=2),
  )
  def test_lowers_for_hopper(self, *, dtype, head_dim, block, num_blocks, num_extra,
                             per_block, causal, window_size, sequence_major=False,
                             tiles_per_cta=None):
    """Forward and backward lower through Mosaic GPU for sm_90 (no GPU needed)."""
    inputs = random_inputs(_seed(self._testMethodName), batch=1, q_heads=4, kv_heads=2,
                           num_blocks=num_blocks, block_q=block, block_k=block, dk=head_dim,
                           dv=head_dim, num_extra=num_extra, per_block=per_block, dtype=dtype,
                           causal=causal, sequence_major=sequence_major)
    spec = core.BlockSpec(block_q=block, block_k=block, causal=causal,
                          extra_keys=core.LOCAL if per_block else core.NONLOCAL,
                          diagonal_keys=core.ALL if causal else core.NONLOCAL, sink_size=4,
                          window_size=window_size, sequence_major=sequence_major)
    fixed = {name: x for name, x in inputs.items() if name not in _DIFFERENTIABLE}

    tiles = mosaic_gpu.default_tiles(head_dim, head_dim, causal)
    if tiles_per_cta is not None:
      tiles = tiles._replace(forward=dataclasses.replace(tiles.forward,
                                                         tiles_per_cta=tiles_per_cta))

    def loss(diff, scale):
      out, lse = mosaic_gpu.block_attention(**diff, **fixed, spec=spec, scale=scale, tiles=tiles)
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    diff = {name: inputs[name] for name in _DIFFERENTIABLE}
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(
        diff, jnp.float32(0.1)).lower(lowering_platforms=("cuda",)).as_text()
    # The forward, dq and dk/dv kernels.
    self.assertEqual(text.count("custom_call @mosaic_gpu"), 3)

  @parameterized.parameters((128, 256), (256, 512))
  def test_sorted_rows_lower_for_hopper(self, head_dim, block):
    """q, k and v given as lsh.SortedRows: the forward kernel reads them through the index
    (raw row copies, GPU only), and forward and backward lower for sm_90."""
    inputs = random_inputs(_seed(self._testMethodName), batch=1, q_heads=4, kv_heads=2,
                           num_blocks=2, block_q=block, block_k=block, dk=head_dim,
                           dv=head_dim, num_extra=256, per_block=False, dtype=jnp.bfloat16)
    spec = core.BlockSpec(block_q=block, block_k=block, extra_keys=core.NONLOCAL,
                          diagonal_keys=core.NONLOCAL)
    q = inputs.pop("q")
    perm = jnp.flip(jnp.arange(q.size // q.shape[-1], dtype=jnp.int32))

    k = inputs.pop("k")
    v = inputs.pop("v")

    def loss(source, k, inputs):
      rows = lsh.SortedRows(source, perm.reshape(q.shape[:-1]), jnp.flip(perm))
      k_perm = jnp.arange(k.size // k.shape[-1], dtype=jnp.int32)
      k_rows, v_rows = (lsh.SortedRows(x.reshape(-1, x.shape[-1]), k_perm.reshape(k.shape[:-1]),
                                       k_perm) for x in (k, v))
      out, _ = mosaic_gpu.block_attention(rows, k_rows, v_rows, **inputs, spec=spec, scale=0.1)
      return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(
        q.reshape(-1, q.shape[-1]), k, inputs).lower(lowering_platforms=("cuda",)).as_text()
    self.assertEqual(text.count("custom_call @mosaic_gpu"), 3)

  @parameterized.parameters((64,), (128,), (256,))
  def test_row_pieces_land_in_the_swizzled_tile(self, dim):
    """The raw row copies' destinations (rows.piece_offset, GPU only) are the addresses of
    Mosaic GPU's (8, 64)-tiled, 128-byte-swizzled tile, derived here bit by bit."""
    rows = 24
    r, piece = np.meshgrid(np.arange(rows), np.arange(dim * 2 // 16), indexing="ij")
    col = piece * 8                                   # 16 bytes: 8 bf16 columns
    linear = ((r // 8) * (dim // 64) + col // 64) * 1024 + (r % 8) * 128 + (col % 64) * 2
    swizzled = linear ^ (((linear >> 7) & 7) << 4)    # bits 4-6 ^= bits 7-9
    np.testing.assert_array_equal(row_copies.piece_offset(r, piece, dim), swizzled)
    self.assertEqual(sorted(swizzled.ravel().tolist()), list(range(0, rows * dim * 2, 16)))

  def test_row_copies_lower_for_hopper(self):
    """benchmarks/bench_row_copies.py's gather kernels (GPU only) still lower for sm_90."""
    from benchmarks import bench_row_copies  # pylint: disable=g-import-not-at-top
    x = jnp.zeros((4 * bench_row_copies.TILE, bench_row_copies.COLS), jnp.bfloat16)
    perm = jnp.arange(x.shape[0], dtype=jnp.int32)
    for gather in (functools.partial(bench_row_copies.gather_pallas, warpgroups=2),
                   bench_row_copies.gather_raw):
      text = jax.jit(gather).trace(x, perm).lower(lowering_platforms=("cuda",)).as_text()
      self.assertEqual(text.count("custom_call @mosaic_gpu"), 1)


class MosaicGpuBackendTest(parameterized.TestCase):

  def test_registered_for_hopper_only(self):
    backend = REGISTRY["mosaic_gpu"]
    self.assertIs(backend.block_attention, mosaic_gpu.block_attention)
    for name in ("cpu", "tpu"):
      self.assertFalse(backend.is_available(name))
    self.assertIn("Hopper", backend.requirement)
    self.assertNotIn("mosaic_gpu", api.available_implementations("cpu"))

  @parameterized.named_parameters(
      dict(testcase_name="float32", dtype=jnp.float32, head_dim=64),
      dict(testcase_name="head_dim_96", dtype=jnp.bfloat16, head_dim=96),
  )
  def test_unsupported_calls_fall_back(self, dtype, head_dim):
    inputs = random_inputs(_seed(self._testMethodName), batch=1, q_heads=1, kv_heads=1,
                           num_blocks=2, block_q=8, block_k=8, dk=head_dim, dv=head_dim,
                           num_extra=4, per_block=False, dtype=dtype)
    spec = core.BlockSpec(block_q=8, block_k=8)
    with self.assertRaises(NotImplementedError):
      mosaic_gpu.block_attention(**inputs, spec=spec, scale=1.0,
                                 interpret=plgpu.InterpretGPUParams())
    # The dispatcher's fallback is the reference itself.
    original = dict(REGISTRY)
    try:
      REGISTRY["mosaic_gpu"] = REGISTRY["mosaic_gpu"]._replace(is_available=lambda _: True)
      dispatch = api.block_attention_for(None)
      chex.assert_trees_all_close(dispatch(**inputs, spec=spec, scale=1.0),
                                  core.block_attention(**inputs, spec=spec, scale=1.0))
    finally:
      REGISTRY.clear()
      REGISTRY.update(original)

  def test_live_prefix(self):
    """Key tiles after the last key that can count are skipped, per block."""
    bias = jnp.array([[[0.0, -jnp.inf, 0.0, -jnp.inf, -jnp.inf, -jnp.inf, -jnp.inf, 5.0]]])
    np.testing.assert_array_equal(layout.live_prefix(bias, 2), [[[3, 4]]])
    np.testing.assert_array_equal(layout.live_prefix(bias, 4), [[[1, 1, 0, 2]]])

  def test_exact_path_conditions(self):
    q = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    kwargs = dict(is_causal=True, scale=0.125, key_value_seq_lengths=None, return_lse=False)
    self.assertTrue(exact.cudnn_applies(q, q, q, **kwargs))
    self.assertFalse(exact.cudnn_applies(q, q, q, **{**kwargs, "return_lse": True}))
    self.assertFalse(exact.cudnn_applies(q.astype(jnp.float32), q.astype(jnp.float32),
                                         q.astype(jnp.float32), **kwargs))
    self.assertFalse(exact.cudnn_applies(q, q, q, **{**kwargs, "key_value_seq_lengths": [3]}))
    self.assertTrue(exact.prefers_exact(8192, is_causal=True))
    self.assertFalse(exact.prefers_exact(16384, is_causal=True))
    self.assertFalse(exact.prefers_exact(1 << 17, is_causal=False))


if __name__ == "__main__":
  absltest.main()
