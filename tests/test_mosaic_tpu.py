"""Tests of the Mosaic TPU kernels of the core primitive.

On CPU the kernels run in Pallas' TPU interpret mode (``pltpu.InterpretParams``), which
simulates the TPU's memories and DMAs (out-of-bounds reads raise, scratch starts as
NaN). Each case runs the forward and the VJP (with an lse cotangent) of the kernels and
of ``core.block_attention`` on fresh random inputs. The lowering test exports the same
computation for a TPU target, which runs the Pallas-to-Mosaic lowering and its checks
(block shapes against the (8, 128) tiling, kernel ops) without a TPU.
"""

import dataclasses
import functools
import re
import zlib

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from hyperattention_jax import core
from hyperattention_jax.kernels import REGISTRY
from hyperattention_jax.kernels import mosaic_tpu
from hyperattention_jax.kernels.mosaic_tpu import BlockSizes
from hyperattention_jax.kernels.mosaic_tpu import tiling
from hyperattention_jax.kernels.mosaic_tpu.selfcheck import DIFFERENTIABLE, forward_and_vjp
from hyperattention_jax.kernels.testing import random_inputs

# Small tiles so that a block spans several of them, a streamed extra set, and one query
# head per step (the heads of a group otherwise share a step).
_SMALL_TILES = BlockSizes(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=256,
                          block_extra=128, resident_extra_bytes=0, rows_per_step=128)

_CASES = (
    # An LSH piece of cross-attention (query and key blocks differ): shuffled positions,
    # one shared sampled set (two resident chunks) with a per-batch bias and same-block
    # exclusion, the exact-set keys left out, GQA, blocks padded to 128-row tiles,
    # value dim != key dim.
    dict(testcase_name="lsh_piece_f32_gqa", batch=2, q_heads=2, kv_heads=1, num_blocks=2,
         block_q=24, block_k=40, dk=32, dv=16, num_extra=130, per_block=False,
         dtype=jnp.float32, block_sizes=BlockSizes(block_extra=128),
         spec=dict(diagonal_keys=core.NONLOCAL, extra_keys=core.NONLOCAL, sink_size=3,
                   window_size=5)),
    # Causal leaves of 200 rows in two 128-row tiles (the tile skip above the diagonal
    # at work), padded query rows (position -1: nothing counts), per-block sinks and
    # window overhang streamed in tiles, GQA.
    dict(testcase_name="causal_leaf_bf16_gqa", batch=1, q_heads=2, kv_heads=1,
         num_blocks=2, block_q=200, block_k=200, dk=32, dv=32, num_extra=150, per_block=True,
         dtype=jnp.bfloat16, causal=True, block_sizes=_SMALL_TILES,
         spec=dict(causal=True, extra_keys=core.LOCAL, sink_size=2, window_size=40)),
    # The same leaves called in the sequence-major layout (transposed in and out).
    dict(testcase_name="causal_leaf_bf16_gqa_sequence_major", batch=1, q_heads=2, kv_heads=1,
         num_blocks=2, block_q=200, block_k=200, dk=32, dv=32, num_extra=150, per_block=True,
         dtype=jnp.bfloat16, causal=True, block_sizes=_SMALL_TILES,
         spec=dict(causal=True, extra_keys=core.LOCAL, sink_size=2, window_size=40,
                   sequence_major=True)),
    # The exact local part: only sinks and window count, per-block extra sets resident.
    dict(testcase_name="local_window_bf16", batch=1, q_heads=2, kv_heads=2, num_blocks=3,
         block_q=48, block_k=48, dk=64, dv=64, num_extra=20, per_block=True,
         dtype=jnp.bfloat16, spec=dict(diagonal_keys=core.LOCAL, extra_keys=core.LOCAL,
                                       sink_size=2, window_size=10)),
    # No extra keys at all (an LSH piece that is a single block).
    dict(testcase_name="no_extras_f32", batch=1, q_heads=2, kv_heads=1, num_blocks=1,
         block_q=40, block_k=40, dk=16, dv=16, num_extra=0, per_block=False,
         dtype=jnp.float32, spec=dict(diagonal_keys=core.NONLOCAL, sink_size=2)),
)


def _seed(name: str) -> int:
  return zlib.crc32(name.encode())


class MosaicTpuKernelTest(parameterized.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_matches_reference(self, *, spec, dtype, block_sizes=None, **shape):
    seed = _seed(self._testMethodName)
    inputs = random_inputs(seed, dtype=dtype, sequence_major=spec.get("sequence_major", False),
                           **shape)
    spec = core.BlockSpec(block_q=shape["block_q"], block_k=shape["block_k"], **spec)
    scale = 0.9 / np.sqrt(shape["dk"])
    # The seed shuffles the order of the parallel grid axes: no step may rely on another's.
    kernel = functools.partial(mosaic_tpu.block_attention, block_sizes=block_sizes,
                               interpret=pltpu.InterpretParams(random_seed=seed))
    (out, lse), (grads, d_scale) = forward_and_vjp(kernel, inputs, spec, scale, seed)
    (ref_out, ref_lse), (ref_grads, ref_d_scale) = forward_and_vjp(
        core.block_attention, inputs, spec, scale, seed)

    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    chex.assert_trees_all_equal_shapes_and_dtypes((out, lse, grads), (ref_out, ref_lse, ref_grads))
    chex.assert_trees_all_equal(jnp.isfinite(lse), jnp.isfinite(ref_lse))
    self.assertTrue(np.any(np.isfinite(np.asarray(lse))))
    chex.assert_trees_all_close(out, ref_out, atol=tol, rtol=tol)
    chex.assert_trees_all_close(lse, ref_lse, atol=tol, rtol=tol)
    chex.assert_tree_all_finite(grads)
    for name in DIFFERENTIABLE:
      with self.subTest(name):
        # Gradients are sums over many products: compare relative to their scale.
        ref = np.asarray(ref_grads[name], np.float32)
        size = 1.0 + np.max(np.abs(ref), initial=0.0)
        chex.assert_trees_all_close(np.asarray(grads[name], np.float32) / size, ref / size,
                                    atol=2 * tol, rtol=0)
    chex.assert_trees_all_close(d_scale, ref_d_scale, atol=2 * tol * (1 + abs(ref_d_scale)),
                                rtol=0)


def _export_for_tpu(inputs, spec, block_sizes=None):
  """StableHLO text of forward + VJP, exported for a TPU target."""
  fixed = {name: x for name, x in inputs.items() if name not in DIFFERENTIABLE}

  def loss(diff, scale):
    out, lse = mosaic_tpu.block_attention(**diff, **fixed, spec=spec, scale=scale,
                                          block_sizes=block_sizes)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  diff = {name: jax.ShapeDtypeStruct(inputs[name].shape, inputs[name].dtype)
          for name in DIFFERENTIABLE}
  scale = jax.ShapeDtypeStruct((), jnp.float32)
  with jax.enable_checks(True):
    exported = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))),
                                 platforms=["tpu"])(diff, scale)
  return exported.mlir_module()


class MosaicTpuLoweringTest(parameterized.TestCase):

  @parameterized.named_parameters(
      # An LSH piece at the default block and sample sizes, bf16, head_dim 128, GQA.
      dict(testcase_name="lsh_bf16_d128", dtype=jnp.bfloat16, head_dim=128, block=256,
           num_blocks=4, num_extra=256, per_block=False, causal=False, block_sizes=None),
      # Causal leaves of 1024 rows (two 512-row tiles), head_dim 256, float32.
      dict(testcase_name="leaf_f32_d256", dtype=jnp.float32, head_dim=256, block=1024,
           num_blocks=2, num_extra=36, per_block=True, causal=True, block_sizes=None),
      # v6e tiles; a block that is not a multiple of 128; extra keys streamed in tiles.
      dict(testcase_name="odd_block_streamed_v6e", dtype=jnp.bfloat16, head_dim=128,
           block=200, num_blocks=3, num_extra=1000, per_block=False, causal=False,
           block_sizes=dataclasses.replace(tiling.default_block_sizes("v6e"),
                                           resident_extra_bytes=0)),
  )
  def test_lowers_for_tpu(self, *, dtype, head_dim, block, num_blocks, num_extra, per_block,
                          causal, block_sizes):
    inputs = random_inputs(_seed(self._testMethodName), batch=1, q_heads=4, kv_heads=2,
                           num_blocks=num_blocks, block_q=block, block_k=block, dk=head_dim,
                           dv=head_dim, num_extra=num_extra, per_block=per_block, dtype=dtype,
                           causal=causal)
    spec = core.BlockSpec(block_q=block, block_k=block, causal=causal,
                          extra_keys=core.LOCAL if per_block else core.ALL, sink_size=4,
                          window_size=32 if per_block else 0)
    module = _export_for_tpu(inputs, spec, block_sizes)
    kernels = re.findall(r'kernel_name = "(hyperattention_block_\w+)"', module)
    self.assertCountEqual(kernels, ["hyperattention_block_fwd", "hyperattention_block_dq",
                                    "hyperattention_block_dkv", "hyperattention_block_dkv_extra"])


class MosaicTpuBackendTest(absltest.TestCase):

  def test_registered_for_tpu_only(self):
    backend = REGISTRY["mosaic_tpu"]
    self.assertIs(backend.block_attention, mosaic_tpu.block_attention)
    self.assertTrue(backend.is_available("tpu"))
    for name in ("cpu", "gpu", "cuda"):
      self.assertFalse(backend.is_available(name))

  def test_unsupported_calls_raise_not_implemented(self):
    inputs = random_inputs(_seed(self._testMethodName), batch=1, q_heads=1, kv_heads=1,
                           num_blocks=1, block_q=8, block_k=8, dk=8, dv=8, num_extra=4,
                           per_block=False, dtype=jnp.float16)
    spec = core.BlockSpec(block_q=8, block_k=8)
    with self.assertRaises(NotImplementedError):
      mosaic_tpu.block_attention(**inputs, spec=spec, scale=1.0, interpret=True)

  def test_tiles(self):
    plan = tiling.plan_tiles(num_blocks=2, block_q=600, block_k=4096, groups=8, num_extra=300,
                             num_extra_sets=1, head_dims=(128, 128), itemsize=2,
                             block_sizes=BlockSizes())
    self.assertEqual((plan.q_tile, plan.q_tiles), (384, 2))
    self.assertEqual((plan.k_tile, plan.k_tiles), (512, 8))
    self.assertEqual((plan.extra_chunk, plan.extra_padded), (384, 384))
    self.assertTrue(plan.extra_resident)
    self.assertEqual(plan.extra_steps, 0)
    self.assertEqual(plan.padded_q % plan.q_tile_dkv, 0)
    self.assertEqual(plan.padded_k % plan.k_tile_dkv, 0)
    self.assertEqual(plan.heads_per_step, 4)  # 4 * 384 rows <= 2048 < 8 * 384
    streamed = tiling.plan_tiles(num_blocks=2, block_q=256, block_k=256, groups=3, num_extra=1000,
                                 num_extra_sets=1, head_dims=(128, 128), itemsize=2,
                                 block_sizes=BlockSizes(resident_extra_bytes=0))
    self.assertFalse(streamed.extra_resident)
    self.assertEqual(streamed.extra_steps * streamed.extra_chunk, streamed.extra_padded)
    self.assertEqual(streamed.heads_per_step, 3)
    with self.assertRaisesRegex(ValueError, "block_q=100"):
      BlockSizes(block_q=100)


if __name__ == "__main__":
  absltest.main()
