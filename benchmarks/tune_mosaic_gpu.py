r"""Tile sizes of the Mosaic GPU kernels, timed on the calls that dominate HyperAttention.

Two calls of the core primitive at the benchmark's sizes: the causal leaves (blocks of
``--leaf`` rows in original order, the sinks as each block's extra keys) and an LSH piece
(blocks of ``--block`` sorted rows plus ``--samples`` shared sampled keys). For each, the
forward kernel is timed with every candidate of its tiles, and forward+backward with every
candidate of the dq and of the dk/dv kernel's tiles (the other kernels at their defaults).
Each row gives the median time, the rate on the call's FLOPs and the largest difference
from the default tiles' result (outputs, or q/k/v gradients), which should be at the level
of 16-bit rounding. Candidates that do not fit (shared memory) print their error.

  PYTHONPATH=. python3 benchmarks/tune_mosaic_gpu.py --out=/tmp/tune.json

Non-default tiles are checked against the reference on the CPU by
``tests/test_mosaic_gpu.py`` (``test_other_tiles``).
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from hyperattention_jax import core
from hyperattention_jax.kernels import mosaic_gpu
from hyperattention_jax.kernels.mosaic_gpu import Tiles

from benchmarks.inputs import leaf_inputs, lsh_inputs, normal
from benchmarks.timing import median_ms

_CALLS = flags.DEFINE_list("calls", ["leaf", "lsh"], "Calls to tune: 'leaf' and/or 'lsh'.")
_HEADS = flags.DEFINE_integer("heads", 32, "Heads (query and key/value).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_LEAF = flags.DEFINE_integer("leaf", 4096, "Rows per causal leaf.")
_LEAF_BLOCKS = flags.DEFINE_integer("leaf_blocks", 8, "Leaves (8 x 4096: n = 32768).")
_BLOCK = flags.DEFINE_integer("block", 256, "Rows per LSH block.")
_LSH_BLOCKS = flags.DEFINE_integer("lsh_blocks", 64, "LSH blocks (64 x 256: a level at 32k).")
_SAMPLES = flags.DEFINE_integer("samples", 256, "Shared sampled keys of the LSH piece.")
_KERNELS = flags.DEFINE_list("kernels", ["forward", "dq", "dkv"],
                             "Kernels whose candidate tiles to time (none: the defaults only).")
_REPS = flags.DEFINE_integer("reps", 10, "Timed calls per candidate.")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 3.0, "Time budget per candidate.")
_OUT = flags.DEFINE_string("out", "", "Write the rows as JSON here.")

# Candidates besides the defaults: (key_tile, query_tile, num_stages, compute_wgs[,
# tiles_per_cta]).
FORWARD = [(64, 64, 2, 2), (64, 64, 3, 2), (64, 64, 4, 2), (128, 64, 3, 2), (128, 64, 2, 1),
           (128, 64, 2, 2, 1), (128, 64, 2, 2, 2), (128, 64, 2, 2, 4), (128, 64, 2, 2, 8),
           (128, 64, 2, 2, 16)]
DQ = [(64, 64, 3, 2), (128, 64, 2, 2), (64, 64, 2, 1)]
# The dk/dv kernel traces with 64-row query tiles only (128 fails in a broadcast).
DKV = [(64, 64, 3, 2), (64, 64, 4, 2), (64, 64, 2, 1)]
_DIFFERENTIABLE = ("q", "k", "v", "extra_k", "extra_v")


def _call(name, dim, dtype=jnp.bfloat16):
  """(inputs, spec, forward FLOPs) of one tuned call."""
  heads = _HEADS.value
  if name == "leaf":
    block, blocks = _LEAF.value, _LEAF_BLOCKS.value
    inputs = leaf_inputs(0, heads=heads, num_blocks=blocks, block=block, dim=dim, sinks=4,
                         dtype=dtype)
    spec = core.BlockSpec(block_q=block, block_k=block, causal=True, extra_keys=core.LOCAL,
                          sink_size=4)
    return inputs, spec, 2 * heads * blocks * block * block * dim
  block, blocks, samples = _BLOCK.value, _LSH_BLOCKS.value, _SAMPLES.value
  inputs = lsh_inputs(1, q_heads=heads, kv_heads=heads, num_blocks=blocks, block_q=block,
                      block_k=block, dk=dim, dv=dim, num_extra=samples, dtype=dtype)
  spec = core.BlockSpec(block_q=block, block_k=block, diagonal_keys=core.NONLOCAL,
                        extra_keys=core.NONLOCAL, sink_size=4)
  return inputs, spec, 4 * heads * blocks * block * (block + samples) * dim


def _functions(inputs, spec, tiles, d_out):
  """Jitted forward and forward+backward (q, k, v, extra key gradients) with ``tiles``."""
  fixed = {n: x for n, x in inputs.items() if n not in _DIFFERENTIABLE}
  attend = lambda diff: mosaic_gpu.block_attention(**diff, **fixed, spec=spec,
                                                   scale=1 / np.sqrt(inputs["q"].shape[-1]),
                                                   tiles=tiles)
  forward = jax.jit(lambda diff: attend(diff)[0])
  grad = jax.jit(jax.grad(lambda diff: jnp.sum(attend(diff)[0].astype(jnp.float32) * d_out)))
  return forward, grad


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tune(name, rows):
  dim = _HEAD_DIM.value
  inputs, spec, flops = _call(name, dim)
  diff = {n: inputs[n] for n in _DIFFERENTIABLE}
  default = mosaic_gpu.default_tiles(dim, dim, spec.causal)
  d_out = normal(jax.random.key(9), inputs["q"].shape, jnp.float32)
  forward, grad = _functions(inputs, spec, default, d_out)
  want_out = jax.block_until_ready(forward(diff))
  want_grads = jax.block_until_ready(grad(diff))
  variants = [("default", default)]
  for kernel, candidates in (("forward", FORWARD), ("dq", DQ), ("dkv", DKV)):
    if kernel in _KERNELS.value:
      variants += [(f"{kernel} {t}", default._replace(**{kernel: Tiles(*t)}))
                   for t in candidates if Tiles(*t) != getattr(default, kernel)]
  print(f"{name}: {spec}; default {default}", flush=True)
  for label, tiles in variants:
    forward, grad = _functions(inputs, spec, tiles, d_out)
    passes = ["fwd", "fwd_bwd"] if label == "default" else (
        ["fwd"] if label.startswith("forward") else ["fwd_bwd"])
    for pass_name in passes:
      fn, want, pass_flops = ((forward, want_out, flops) if pass_name == "fwd"
                              else (grad, want_grads, 3.5 * flops))
      print(f"  {label:28s} {pass_name:7s} compiling and checking...", end="\r", flush=True)
      try:
        got = jax.block_until_ready(fn(diff))
        ms = median_ms(fn, diff, reps=_REPS.value, warmup=1, max_seconds=_MAX_SECONDS.value)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {label:28s} {pass_name:7s} ERROR {type(e).__name__}: {str(e)[:300]}",
              flush=True)
        continue
      row = dict(call=name, variant=label, tiles=str(tiles), pass_name=pass_name, ms=ms,
                 tflops=pass_flops / ms / 1e9, max_diff=_max_diff(got, want))
      rows.append(row)
      print(f"  {label:28s} {pass_name:7s} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s "
            f"max diff {row['max_diff']:.2e}", flush=True)


def main(argv):
  del argv
  print(f"jax {jax.__version__}; {jax.devices()[0].device_kind}", flush=True)
  rows = []
  for name in _CALLS.value:
    tune(name, rows)
    if _OUT.value:
      with open(_OUT.value, "w", encoding="utf-8") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, rows=rows), f, indent=1)


if __name__ == "__main__":
  app.run(main)
