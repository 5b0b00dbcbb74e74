"""Sharded HyperAttention against one device: agreement and strong scaling.

For one global problem, times ``hyper_attention`` on one device and
``sharded_hyper_attention`` on a mesh of all the devices (or ``--num_devices``) with the
batch, the heads or the sequence split, forward and forward+backward, and checks that the
sharded outputs (and gradients) agree with the single-device ones. Prints a Markdown table.

  PYTHONPATH=. python3 benchmarks/sharding_benchmark.py            # B=2, 32 heads, 32k, bf16

A small run on CPU host devices, to try the script:

  XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONPATH=. \
      python3 benchmarks/sharding_benchmark.py --seq_len=1024 --heads=4 --head_dim=32 \
      --min_seq_len=256 --block_size=64 --sample_size=64 --repeats=2

Times are wall clock after a warm-up call, median of ``--repeats``. "rel. diff" is
``|sharded - one device| / |one device|`` (Frobenius norms, over the output or over all
three gradients); with the same random draws it stays at rounding level, except that a
row lying on an LSH hyperplane may hash differently when the two programs round
differently.
"""

import math

from absl import app
from absl import flags
import jax
from jax.sharding import AxisType, NamedSharding
import jax.numpy as jnp
import numpy as np

import hyperattention_jax as ha
from hyperattention_jax.sharding import activation_spec, sharded_hyper_attention

from benchmarks.timing import median_ms

_BATCH = flags.DEFINE_integer("batch", 2, "Batch size (global).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 32768, "Sequence length.")
_HEADS = flags.DEFINE_integer("heads", 32, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", None, "Key/value heads (default: --heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"],
                           "Input dtype.")
_CAUSAL = flags.DEFINE_boolean("causal", True, "Causal self-attention.")
_MODES = flags.DEFINE_list("modes", ["batch", "head", "seq"], "Splits to time.")
_PASSES = flags.DEFINE_list("passes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices of the mesh (0: all).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median reported).")
_CHECK = flags.DEFINE_boolean("check", True, "Compare sharded results with one device.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 256, "HyperAttentionConfig.block_size.")
_SAMPLE_SIZE = flags.DEFINE_integer("sample_size", 256, "HyperAttentionConfig.sample_size.")
_MIN_SEQ_LEN = flags.DEFINE_integer("min_seq_len", 4096, "HyperAttentionConfig.min_seq_len.")
_IMPLEMENTATION = flags.DEFINE_string("implementation", None,
                                      "Core implementation (None: best for the backend).")

MODE_AXES = {"batch": "batch_axis", "head": "head_axis", "seq": "seq_axis"}


def time_ms(fn, args):
  """Median wall-clock ms of ``--repeats`` calls of ``fn(*args)``, after one warm-up call."""
  return median_ms(fn, *args, reps=_REPEATS.value, warmup=1, max_seconds=math.inf)


def make_pass(attention, name):
  """``fwd``: the output; ``fwd_bwd``: gradients of ``sum(out * cotangent)`` w.r.t. q, k, v."""
  if name == "fwd":
    return jax.jit(lambda q, k, v, cot: attention(q, k, v))

  def loss(q, k, v, cot):
    return jnp.sum(attention(q, k, v).astype(jnp.float32) * cot.astype(jnp.float32))

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def relative_difference(got, want, device):
  """Frobenius-norm relative difference of two pytrees, computed on ``device``."""
  num, den = 0.0, 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g = jax.device_put(g, device).astype(jnp.float32)
    w = w.astype(jnp.float32)
    num += float(jnp.sum(jnp.square(g - w)))
    den += float(jnp.sum(jnp.square(w)))
  return float(np.sqrt(num / max(den, 1e-30)))


def split_problem(mode, num_devices, shape, kv_heads):
  """Why ``mode`` cannot split this problem over ``num_devices``, or None."""
  batch, seq_len, heads, _ = shape
  if mode == "batch" and batch % num_devices:
    return f"batch {batch} % {num_devices} devices"
  if mode == "head" and heads % num_devices:
    return f"heads {heads} % {num_devices} devices"
  if mode == "seq" and (heads % num_devices or seq_len % num_devices):
    return f"heads {heads} or seq_len {seq_len} % {num_devices} devices"
  if mode in ("head", "seq") and kv_heads % num_devices and num_devices % kv_heads:
    return f"kv_heads {kv_heads} vs {num_devices} devices"
  return None


def main(argv):
  del argv
  for mode in _MODES.value:
    if mode not in MODE_AXES:
      raise app.UsageError(f"--modes: {mode!r} is not one of {sorted(MODE_AXES)}.")
  for name in _PASSES.value:
    if name not in ("fwd", "fwd_bwd"):
      raise app.UsageError(f"--passes: {name!r} is not fwd or fwd_bwd.")
  devices = jax.devices()
  num_devices = _NUM_DEVICES.value or len(devices)
  if num_devices > len(devices):
    raise app.UsageError(f"--num_devices={num_devices} but only {len(devices)} devices.")
  dtype = jnp.dtype(_DTYPE.value)
  kv_heads = _KV_HEADS.value or _HEADS.value
  shape = (_BATCH.value, _SEQ_LEN.value, _HEADS.value, _HEAD_DIM.value)
  kv_shape = shape[:2] + (kv_heads, _HEAD_DIM.value)
  config = ha.HyperAttentionConfig(block_size=_BLOCK_SIZE.value, sample_size=_SAMPLE_SIZE.value,
                                   min_seq_len=_MIN_SEQ_LEN.value)
  causal, implementation = _CAUSAL.value, _IMPLEMENTATION.value
  rng = jax.random.key(1)

  # Listing the implementations loads the kernels before anything is traced (loading them
  # inside a trace changes JAX's configuration, and the timed calls would compile again).
  print(f"backend {jax.default_backend()}: {len(devices)} x {devices[0].device_kind}, "
        f"implementations {ha.available_implementations()}, jax {jax.__version__}")
  print(f"[batch, seq, heads, head_dim]={shape} kv_heads={kv_heads} dtype={dtype.name} "
        f"causal={causal} implementation={implementation} {config}")

  one = devices[0]
  keys = jax.random.split(jax.random.key(0), 4)
  inputs = [jax.device_put(jax.random.normal(key, s, dtype), one)
            for key, s in zip(keys, (shape, kv_shape, kv_shape, shape))]

  def unsharded(q, k, v):
    return ha.hyper_attention(q, k, v, rng=rng, is_causal=causal, config=config,
                              implementation=implementation)

  mesh = jax.make_mesh((num_devices,), ("x",), axis_types=(AxisType.Auto,),
                       devices=devices[:num_devices])

  def sharded_inputs(mode):
    """The inputs placed where the ``mode`` split reads them, and its attention function."""
    axes = {MODE_AXES[mode]: "x"}
    kv_axes = axes if mode != "head" or kv_heads % num_devices == 0 else {}
    q_sharding = NamedSharding(mesh, activation_spec(**axes))
    kv_sharding = NamedSharding(mesh, activation_spec(**kv_axes))
    placed = [jax.device_put(x, s) for x, s in
              zip(inputs, (q_sharding, kv_sharding, kv_sharding, q_sharding))]

    def sharded(q, k, v):
      return sharded_hyper_attention(q, k, v, mesh=mesh, rng=rng, is_causal=causal,
                                     config=config, implementation=implementation, **axes)
    return placed, sharded

  rows = []
  for name in _PASSES.value:
    try:
      baseline = make_pass(unsharded, name)
      base_ms = time_ms(baseline, inputs)
      want = baseline(*inputs) if _CHECK.value and num_devices > 1 else None
    except Exception as error:  # pylint: disable=broad-exception-caught
      # Report and go on: one failing measurement (e.g. out of memory) keeps the others.
      print(f"  {name} on one device failed: {type(error).__name__}: {error}"[:500], flush=True)
      rows.append(("one device (failed)", 1, name, None, None, None, None))
      continue
    rows.append(("one device", 1, name, base_ms, 1.0, 1.0, None))
    print(f"  {name} on one device: {base_ms:.2f} ms", flush=True)
    if num_devices == 1:
      continue
    for mode in _MODES.value:
      reason = split_problem(mode, num_devices, shape, kv_heads)
      if reason:
        print(f"  {name} {mode}-split: skipped ({reason})")
        continue
      try:
        placed, sharded = sharded_inputs(mode)
        fn = make_pass(sharded, name)
        ms = time_ms(fn, placed)
        diff = relative_difference(fn(*placed), want, one) if want is not None else None
      except Exception as error:  # pylint: disable=broad-exception-caught
        print(f"  {name} {mode}-split failed: {type(error).__name__}: {error}"[:500], flush=True)
        rows.append((f"{mode} split (failed)", num_devices, name, None, None, None, None))
        continue
      speedup = base_ms / ms
      rows.append((f"{mode} split", num_devices, name, ms, speedup,
                   speedup / num_devices, diff))
      print(f"  {name} {mode}-split on {num_devices}: {ms:.2f} ms", flush=True)
      del placed
    del want

  print()
  print("| split | devices | pass | time (ms) | speedup | efficiency | rel. diff vs one device |")
  print("|---|---|---|---|---|---|---|")
  for mode, count, name, ms, speedup, efficiency, diff in rows:
    if ms is None:
      print(f"| {mode} | {count} | {name} | | | | |")
      continue
    diff_text = "" if diff is None else f"{diff:.1e}"
    print(f"| {mode} | {count} | {name} | {ms:.2f} | {speedup:.2f}x | {efficiency:.0%} | "
          f"{diff_text} |")
  diffs = [row[-1] for row in rows if row[-1] is not None]
  if diffs:
    # About one unit of rounding of a 16-bit output; float32 sums in another order.
    tolerance = 1e-4 if dtype == jnp.float32 else 1e-2
    verdict = "agree" if max(diffs) <= tolerance else "DISAGREE"
    print(f"\nsharded vs one device: largest rel. diff {max(diffs):.1e}, tolerance "
          f"{tolerance:.1e}: {verdict}")


if __name__ == "__main__":
  app.run(main)
