"""Checks the Mosaic TPU kernels against the reference and times both, on a real TPU.

  PYTHONPATH=. python3 -m hyperattention_jax.kernels.mosaic_tpu.selfcheck
  PYTHONPATH=. python3 -m hyperattention_jax.kernels.mosaic_tpu.selfcheck --block_q=1024

For each call shape HyperAttention makes (an LSH piece with shared samples, a causal
leaf with sinks and window overhang), it runs the forward and the VJP of the kernels and
of ``core.block_attention``, prints the largest error relative to each output's scale,
and the median wall time of both. The tile flags override ``default_block_sizes()``, so
one run per setting compares block sizes. ``--interpret`` runs small shapes on CPU.

The forward + VJP driver is shared with the tests; the inputs come from
``hyperattention_jax.kernels.testing``.
"""

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from hyperattention_jax import core
from hyperattention_jax.kernels.mosaic_tpu import attention
from hyperattention_jax.kernels.mosaic_tpu import tiling
from hyperattention_jax.kernels.testing import random_inputs

DIFFERENTIABLE = ("q", "k", "v", "extra_k", "extra_v", "extra_bias")


def forward_and_vjp_fn(block_attention, inputs, spec, seed):
  """A jitted ``(diff, scale) -> ((o, lse), (d_diff, d_scale))`` with fixed random cotangents.

  ``diff`` holds the inputs named in ``DIFFERENTIABLE``; the lse cotangent is random too,
  so its path through the backward kernels is checked.
  """
  fixed = {name: x for name, x in inputs.items() if name not in DIFFERENTIABLE}

  def attend(diff, scale):
    return block_attention(**diff, **fixed, spec=spec, scale=scale)

  def run(diff, scale):
    (out, lse), vjp = jax.vjp(attend, diff, scale)
    rng = np.random.default_rng(seed + 1)
    d_out = jnp.asarray(rng.normal(size=out.shape), out.dtype)
    d_lse = jnp.asarray(rng.normal(size=lse.shape), jnp.float32)
    return (out, lse), vjp((d_out, d_lse))

  return jax.jit(run)


def forward_and_vjp(block_attention, inputs, spec, scale, seed):
  """``((o, lse), (grads, d_scale))`` of ``block_attention`` on ``inputs``."""
  diff = {name: inputs[name] for name in DIFFERENTIABLE}
  return forward_and_vjp_fn(block_attention, inputs, spec, seed)(diff, jnp.float32(scale))


def scaled_error(x, ref):
  """max |x - ref| / (1 + max |ref|) over the finite entries of ``ref``."""
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  finite = np.isfinite(ref)
  if not np.array_equal(finite, np.isfinite(x)):
    return np.inf
  x, ref = np.where(finite, x, 0.0), np.where(finite, ref, 0.0)
  return float(np.abs(x - ref).max(initial=0.0) / (1.0 + np.abs(ref).max(initial=0.0)))


def _median_seconds(fn, *args, repeats: int):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


# Call shapes HyperAttention makes at scale: an LSH piece (block 256, 256 shared
# samples, GQA) and causal leaves (4096 rows, sinks and a window overhang per block).
_CALLS = {
    "lsh_piece": dict(batch=1, q_heads=16, kv_heads=4, num_blocks=64, block_q=256, block_k=256,
                      num_extra=256, per_block=False,
                      spec=dict(diagonal_keys=core.NONLOCAL, extra_keys=core.NONLOCAL,
                                sink_size=4)),
    "causal_leaf": dict(batch=1, q_heads=8, kv_heads=2, num_blocks=2, block_q=4096,
                        block_k=4096, num_extra=4 + 1023, per_block=True, causal=True,
                        spec=dict(causal=True, extra_keys=core.LOCAL, sink_size=4,
                                  window_size=1024)),
}
_SMALL_CALLS = {  # --interpret: the same structure, CPU-sized
    "lsh_piece": dict(_CALLS["lsh_piece"], q_heads=4, kv_heads=2, num_blocks=2, block_q=128,
                      block_k=128, num_extra=64),
    "causal_leaf": dict(_CALLS["causal_leaf"], q_heads=2, kv_heads=1, block_q=256,
                        block_k=256, num_extra=4 + 31, spec=dict(causal=True,
                                                                 extra_keys=core.LOCAL,
                                                                 sink_size=4, window_size=32)),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--interpret", action="store_true",
                      help="run small shapes in TPU interpret mode (CPU)")
  parser.add_argument("--head_dims", default="128,256")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--repeats", type=int, default=10)
  for field in dataclasses.fields(tiling.BlockSizes):
    parser.add_argument(f"--{field.name}", type=int, default=None)
  args = parser.parse_args(argv)

  block_sizes = tiling.default_block_sizes()
  overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(tiling.BlockSizes)
               if getattr(args, f.name) is not None}
  block_sizes = dataclasses.replace(block_sizes, **overrides)
  print(f"backend={jax.default_backend()} devices={jax.devices()[0].device_kind} "
        f"{block_sizes}")
  kernel = functools.partial(attention.block_attention, block_sizes=block_sizes,
                             interpret=args.interpret)
  calls = _SMALL_CALLS if args.interpret else _CALLS
  dtype = jnp.dtype(args.dtype)
  tolerance = 1e-4 if dtype == jnp.float32 else 3e-2
  for name, call in calls.items():
    for head_dim in (int(d) for d in args.head_dims.split(",")):
      call = dict(call)
      spec = core.BlockSpec(block_q=call["block_q"], block_k=call["block_k"],
                            **call.pop("spec"))
      inputs = random_inputs(0, dk=head_dim, dv=head_dim, dtype=dtype, **call)
      diff = {n: inputs[n] for n in DIFFERENTIABLE}
      scale = jnp.float32(1 / np.sqrt(head_dim))
      results, seconds = [], []
      for block_attention in (kernel, core.block_attention):
        fwd = jax.jit(lambda d, s, f=block_attention: f(**d, **{
            n: x for n, x in inputs.items() if n not in DIFFERENTIABLE}, spec=spec, scale=s))
        both = forward_and_vjp_fn(block_attention, inputs, spec, seed=0)
        results.append(both(diff, scale))
        seconds.append((_median_seconds(fwd, diff, scale, repeats=args.repeats),
                        _median_seconds(both, diff, scale, repeats=args.repeats)))
      errors = jax.tree.map(scaled_error, results[0], results[1])
      worst = max(jax.tree.leaves(errors))
      status = "ok" if worst <= tolerance else "MISMATCH"
      print(f"{name:12s} d={head_dim:3d} worst error {worst:.2e} [{status}]  "
            f"fwd {seconds[0][0] * 1e3:8.3f} ms (xla {seconds[1][0] * 1e3:8.3f})  "
            f"fwd+bwd {seconds[0][1] * 1e3:8.3f} ms (xla {seconds[1][1] * 1e3:8.3f})")
      if status != "ok":
        for path, error in jax.tree_util.tree_flatten_with_path(errors)[0]:
          print(f"    {jax.tree_util.keystr(path)}: {error:.2e}")


if __name__ == "__main__":
  main()
