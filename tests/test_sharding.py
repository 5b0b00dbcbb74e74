"""Sharded HyperAttention against the unsharded call, forward and backward, on 8 CPU devices.

XLA fixes the number of CPU devices when JAX starts, so the checks that need 8 devices
run in child processes started with ``XLA_FLAGS``; under a plain ``pytest tests/`` the
parent process only starts them (one per test class, in parallel) and reports their
outcome; the 8-device classes are defined only in a process that has the devices. To run
the checks directly:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python3 tests/test_sharding.py
"""

import math
import os
import subprocess
import sys
import time

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax.sharding import AxisType, NamedSharding
import jax.numpy as jnp
import numpy as np

from hyperattention_jax import hyper_attention
from hyperattention_jax.config import HyperAttentionConfig
from hyperattention_jax.sharding import activation_spec, sharded_hyper_attention

NUM_DEVICES = 8
# XLA:CPU spends nearly all of these tests compiling; a lower backend optimisation level
# cuts that several-fold. Both sides of every comparison are compiled alike.
CHILD_XLA_FLAGS = (f"--xla_force_host_platform_device_count={NUM_DEVICES} "
                   "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
CHILD_TIMEOUT_S = 600

# Small, but long enough for the LSH pieces: 64 rows > min_seq_len, 4 blocks, causal
# recursion of depth 1. Sinks off: the exact local part involves no randomness.
CONFIG = HyperAttentionConfig(block_size=16, sample_size=16, min_seq_len=32, sink_size=0)
BATCH, SEQ_LEN, NUM_HEADS, HEAD_DIM, VALUE_DIM = 2, 64, 8, 16, 8


def _mesh(shape, names, axis_type):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def _fresh_inputs(seed, num_kv_heads):
  """Random query, key, value, output cotangent and lse cotangent."""
  rng = np.random.default_rng(seed)
  shapes = ((BATCH, SEQ_LEN, NUM_HEADS, HEAD_DIM), (BATCH, SEQ_LEN, num_kv_heads, HEAD_DIM),
            (BATCH, SEQ_LEN, num_kv_heads, VALUE_DIM), (BATCH, SEQ_LEN, NUM_HEADS, VALUE_DIM),
            (BATCH, NUM_HEADS, SEQ_LEN))
  return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


def _loss_and_grads(attention, q, k, v, out_cot, lse_cot):
  """Output, lse and the gradients of a random linear function of both."""
  def loss(q, k, v):
    out, lse = attention(q, k, v)
    return jnp.sum(out * out_cot) + jnp.sum(lse * lse_cot), (out, lse)
  (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, lse, grads


class _EightDeviceTest(parameterized.TestCase):
  """Checks that need NUM_DEVICES devices (run in a child process by SubprocessTest)."""

  def check_against_unsharded(self, *, mesh, num_kv_heads, is_causal, lengths=None, **axes):
    seed = time.time_ns() % 2**32
    q, k, v, out_cot, lse_cot = _fresh_inputs(seed, num_kv_heads)
    rng = jax.random.key(seed)
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    common = dict(rng=rng, is_causal=is_causal, config=CONFIG, key_value_seq_lengths=lengths,
                  return_lse=True)

    want = jax.jit(lambda *a: _loss_and_grads(
        lambda q, k, v: hyper_attention(q, k, v, **common), *a))(q, k, v, out_cot, lse_cot)

    # Place the inputs where the sharded call reads them: it must then move nothing but
    # the all-to-alls of sequence parallelism (no all-gather, forward or backward).
    head_axis = axes.get("head_axis") or ()
    head_devices = math.prod(mesh.shape[n] for n in ((head_axis,) if isinstance(head_axis, str)
                                                     else head_axis))
    kv_axes = dict(axes, head_axis=axes.get("head_axis") if num_kv_heads % head_devices == 0
                   else None)
    q_sharding, kv_sharding = (NamedSharding(mesh, activation_spec(**a)) for a in (axes, kv_axes))
    q, out_cot = (jax.device_put(x, q_sharding) for x in (q, out_cot))
    k, v = (jax.device_put(x, kv_sharding) for x in (k, v))
    sharded = jax.jit(lambda *a: _loss_and_grads(
        lambda q, k, v: sharded_hyper_attention(q, k, v, mesh=mesh, **axes, **common), *a))
    compiled = sharded.lower(q, k, v, out_cot, lse_cot).compile()
    got = compiled(q, k, v, out_cot, lse_cot)

    msg = f"seed={seed}, mesh={dict(mesh.shape)}, axes={axes}, is_causal={is_causal}"
    self.assertNotIn("all-gather", compiled.as_text(), msg)
    self.assertTrue(got[0].sharding.is_equivalent_to(q_sharding, 4), msg)
    chex.assert_tree_all_finite(got)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5, custom_message=msg)


class NonCausalShardingTest(_EightDeviceTest):

  @parameterized.named_parameters(
      # 4 kv heads over 4 head devices: whole key/value heads per device.
      ("batch_and_heads", (2, 4), ("data", "model"), AxisType.Auto,
       dict(batch_axis="data", head_axis="model")),
      # 4 kv heads, 8 devices after the all-to-all: two devices read each kv head.
      ("sequence", (8,), ("seq",), AxisType.Explicit, dict(seq_axis="seq")),
      # 4 kv heads cannot be split over 8 head devices: they are replicated and each
      # device picks its own.
      ("heads_grouped_query", (8,), ("model",), AxisType.Auto, dict(head_axis="model")),
  )
  def test_matches_unsharded(self, shape, names, axis_type, axes):
    self.check_against_unsharded(mesh=_mesh(shape, names, axis_type), num_kv_heads=4,
                                 is_causal=False, lengths=[SEQ_LEN, 41], **axes)

  def test_output_only_with_default_rng(self):
    """Eager call on unplaced inputs, no lse, no rng: still the unsharded result."""
    q, k, v = _fresh_inputs(time.time_ns() % 2**32, 2)[:3]
    mesh = _mesh((2, 4), ("data", "seq"), AxisType.Explicit)
    got = sharded_hyper_attention(q, k, v, mesh=mesh, batch_axis="data", seq_axis="seq",
                                  config=CONFIG)
    self.assertEqual(got.sharding.spec, activation_spec(batch_axis="data", seq_axis="seq"))
    chex.assert_trees_all_close(got, hyper_attention(q, k, v, config=CONFIG), rtol=1e-5,
                                atol=1e-5)


class CausalShardingTest(_EightDeviceTest):

  @parameterized.named_parameters(
      # 2 kv heads split over 2 head devices, then each of 4 sequence devices reads one.
      ("heads_and_sequence", (2, 4), ("model", "seq"), AxisType.Explicit,
       dict(head_axis="model", seq_axis="seq")),
      # A sequence split over two mesh axes at once.
      ("batch_and_sequence_two_axes", (2, 2, 2), ("data", "s1", "s2"), AxisType.Auto,
       dict(batch_axis="data", seq_axis=("s1", "s2"))),
      # Multi-query attention, heads over all 8 devices.
      ("heads_multi_query", (8,), ("model",), AxisType.Explicit, dict(head_axis="model")),
  )
  def test_matches_unsharded(self, shape, names, axis_type, axes):
    num_kv_heads = 1 if axes == dict(head_axis="model") else 2
    self.check_against_unsharded(mesh=_mesh(shape, names, axis_type),
                                 num_kv_heads=num_kv_heads, is_causal=True, **axes)


class ShardingErrorsTest(_EightDeviceTest):
  """Outside its limits the sharded call raises a ValueError naming the sizes."""

  @parameterized.named_parameters(
      ("heads_not_divisible", dict(num_heads=6), dict(seq_axis="seq"), "num_heads=6"),
      ("kv_heads_straddle_devices", dict(num_heads=24, num_kv_heads=3), dict(seq_axis="seq"),
       "num_kv_heads=3"),
      ("batch_not_divisible", dict(batch=3), dict(batch_axis="seq"), "batch=3"),
      ("length_not_divisible", dict(seq_len=36), dict(seq_axis="seq"), "q_len=36"),
      ("unknown_axis", {}, dict(head_axis="model"), "no axis 'model'"),
      ("axis_twice", {}, dict(head_axis="seq", seq_axis=("seq",)), "one role once"),
      ("bad_axis_type", {}, dict(head_axis=["seq"]), "mesh axis name"),
  )
  def test_raises(self, sizes, axes, message):
    sizes = dict(dict(batch=2, seq_len=64, num_heads=8, num_kv_heads=8), **sizes)
    q = jnp.zeros((sizes["batch"], sizes["seq_len"], sizes["num_heads"], HEAD_DIM))
    kv = jnp.zeros((sizes["batch"], sizes["seq_len"], sizes["num_kv_heads"], HEAD_DIM))
    mesh = _mesh((NUM_DEVICES,), ("seq",), AxisType.Auto)
    with self.assertRaisesRegex(ValueError, message):
      sharded_hyper_attention(q, kv, kv, mesh=mesh, config=CONFIG, **axes)

  def test_rejects_non_mesh(self):
    q = jnp.zeros((2, 64, 8, HEAD_DIM))
    with self.assertRaisesRegex(ValueError, "jax.sharding.Mesh"):
      sharded_hyper_attention(q, q, q, mesh=jax.devices(), head_axis="model")


class SubprocessTest(absltest.TestCase):
  """Runs each 8-device class in a child process whose XLA has 8 CPU devices."""

  def test_eight_device_classes(self):
    flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), CHILD_XLA_FLAGS]))
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    # Two children (each pays for starting JAX once), about equal in work.
    children = {
        names: subprocess.Popen([sys.executable, os.path.abspath(__file__), *names.split()],
                                env=env, cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for names in ("NonCausalShardingTest ShardingErrorsTest", "CausalShardingTest")}
    for name, child in children.items():
      output, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
      self.assertEqual(child.returncode, 0, f"{name} failed in the child:\n{output[-6000:]}")
      self.assertNotIn("skipped", output.lower(), f"{name} was skipped in the child:\n{output}")


# Each process collects only what it can run: the checks themselves where there are
# NUM_DEVICES devices, otherwise the test that runs them in children.
if jax.device_count() < NUM_DEVICES:
  del NonCausalShardingTest, CausalShardingTest, ShardingErrorsTest
else:
  del SubprocessTest

if __name__ == "__main__":
  absltest.main()
