r"""Checks the Mosaic GPU kernels against the reference at real shapes, on a Hopper GPU.

For each case the core primitive runs forward and backward (random output and lse
cotangents) through the kernels and through ``core.block_attention``; the script prints
the largest errors relative to each tensor's scale, checks that two backward runs give
identical bits, and compares ``hyper_attention`` end to end (mosaic_gpu against xla).

  PYTHONPATH=. python3 benchmarks/check_mosaic_gpu.py --out=/tmp/check.json
"""

import functools
import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import hyperattention_jax as ha
from hyperattention_jax import core
from hyperattention_jax.kernels import mosaic_gpu
from hyperattention_jax.local import local_attention

from benchmarks.inputs import lsh_inputs, normal as _normal

_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_CASES = flags.DEFINE_list("cases", [], "Run only these cases (default: all).")

_DIFFERENTIABLE = ("q", "k", "v", "extra_k", "extra_v", "extra_bias")


def cotangents(out, lse, seed):
  keys = jax.random.split(jax.random.key(seed + 1))
  return _normal(keys[0], out.shape, out.dtype), jax.random.normal(keys[1], lse.shape, jnp.float32)


def primitive_vjp(block_attention, inputs, spec, scale, seed, lse_shift=None):
  """(o, lse) and the VJP of every float input under random cotangents.

  ``lse_shift`` is added to the lse cotangent (see ``check_primitive``).
  """
  fixed = {name: x for name, x in inputs.items() if name not in _DIFFERENTIABLE}

  @jax.jit
  def run(diff, scale):
    attend = lambda diff, scale: block_attention(**diff, **fixed, spec=spec, scale=scale)
    (out, lse), vjp = jax.vjp(attend, diff, scale)
    d_out, d_lse = cotangents(out, lse, seed)
    if lse_shift is not None:
      d_lse = d_lse + lse_shift
    return (out, lse), vjp((d_out, d_lse))

  return run({name: inputs[name] for name in _DIFFERENTIABLE}, jnp.float32(scale))


def local_vjp(block_attention, inputs, *, causal, block, sink_size, window_size, scale, seed):
  """The exact local part (causal leaves or sinks and window) through ``local_attention``."""

  @jax.jit
  def run(q, k, v):
    def attend(q, k, v):
      return local_attention(q, k, v, inputs["q_pos"], inputs["k_pos"], block_size=block,
                             causal=causal, sink_size=sink_size, window_size=window_size,
                             scale=scale, block_attention=block_attention)
    (out, lse), vjp = jax.vjp(attend, q, k, v)
    keys = jax.random.split(jax.random.key(seed + 1))
    d_out = _normal(keys[0], out.shape, out.dtype)
    d_lse = jax.random.normal(keys[1], lse.shape, jnp.float32)
    return (out, lse), vjp((d_out, d_lse))

  return run(inputs["q"], inputs["k"], inputs["v"])


def relative_error(x, ref):
  """max |x - ref| / (1 + max |ref|) over finite reference entries."""
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  finite = np.isfinite(ref)
  if not np.array_equal(finite, np.isfinite(x)):
    return float("inf")
  diff = np.abs(np.where(finite, x - ref, 0.0))
  return float(np.max(diff, initial=0.0) / (1.0 + np.max(np.abs(np.where(finite, ref, 0.0)),
                                                           initial=0.0)))


def compare(name, result, reference):
  errors = jax.tree.map(relative_error, result, reference)
  flat = {jax.tree_util.keystr(path): err
          for path, err in jax.tree_util.tree_leaves_with_path(errors)}
  worst = max(flat.values())
  print(f"  {name}: worst relative error {worst:.2e}", flush=True)
  for path, err in flat.items():
    print(f"    {path}: {err:.2e}")
  return flat


def check_primitive(name, inputs, spec, scale, seed, tol):
  print(f"[{name}] shapes q{tuple(inputs['q'].shape)} k{tuple(inputs['k'].shape)} "
        f"extra{tuple(inputs['extra_k'].shape)} {inputs['q'].dtype} spec={spec}", flush=True)
  t0 = time.perf_counter()
  result = primitive_vjp(mosaic_gpu.block_attention, inputs, spec, scale, seed)
  jax.block_until_ready(result)
  print(f"  kernels: {time.perf_counter() - t0:.1f} s (compile and run)", flush=True)
  again = primitive_vjp(mosaic_gpu.block_attention, inputs, spec, scale, seed)
  identical = all(np.array_equal(np.asarray(a), np.asarray(b))
                  for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(again)))
  reference = primitive_vjp(core.block_attention, inputs, spec, scale, seed)
  errors = compare(name, result, reference)
  (_, _), (grads, d_scale) = result
  (_, _), (ref_grads, ref_d_scale) = reference
  print(f"  d_scale {float(d_scale):.6g} (reference {float(ref_d_scale):.6g}); d_extra_bias "
        f"{np.asarray(grads['extra_bias'])} (reference {np.asarray(ref_grads['extra_bias'])})")
  # Like FlashAttention, the backward takes delta = rowsum(dO * o) from the stored 16-bit o.
  # The reference below differentiates with the same delta (its lse cotangent shifted by
  # rowsum(dO * (o_f32 - o))), which separates that rounding from kernel errors; the
  # scale and bias gradients are sums over all rows that mostly cancel, so it shows there.
  upcast = {n: x.astype(jnp.float32) if x.dtype in (jnp.bfloat16, jnp.float16) else x
            for n, x in inputs.items()}
  out32 = core.block_attention(**upcast, spec=spec, scale=scale)[0]
  d_out, _ = cotangents(result[0][0], result[0][1], seed)
  shift = jnp.sum(d_out.astype(jnp.float32) * (out32 - result[0][0].astype(jnp.float32)), -1)
  same_delta = primitive_vjp(core.block_attention, inputs, spec, scale, seed, lse_shift=shift)
  print("  against the reference with the kernels' delta:")
  delta_errors = compare(name, result[1], same_delta[1])
  grads_ok = max(delta_errors.values()) < 2 * tol
  fwd_ok = max(errors[k] for k in errors if k.startswith("[0]")) < tol
  # A loose bound against the plain reference too, except on those two sums (d extra_bias,
  # d scale), which the comparison with the kernels' delta judges: where they nearly cancel,
  # the 16-bit rounding of o alone moves them by tens of percent.
  sums = ("['extra_bias']", "[1][1]")
  ok = identical and fwd_ok and grads_ok and max(
      err for path, err in errors.items() if not path.endswith(sums)) < 0.2
  print(f"  deterministic: {identical}; {'PASS' if ok else 'FAIL'}", flush=True)
  return dict(errors=errors, errors_same_delta=delta_errors, deterministic=identical, ok=ok,
              d_scale=[float(d_scale), float(ref_d_scale)])


def check_local(name, *, heads, seq, block, causal, sink_size, window_size, dtype, seed, tol):
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (1, seq, heads, 128)  # sequence-major, as local_attention takes it
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (1, heads, seq))
  inputs = dict(q=_normal(keys[0], shape, dtype), k=_normal(keys[1], shape, dtype),
                v=_normal(keys[2], shape, dtype), q_pos=positions, k_pos=positions)
  print(f"[{name}] local part: seq={seq} block={block} causal={causal} sink={sink_size} "
        f"window={window_size} {jnp.dtype(dtype).name}", flush=True)
  run = functools.partial(local_vjp, causal=causal, block=block, sink_size=sink_size,
                          window_size=window_size, scale=1 / np.sqrt(128), seed=seed)
  result = run(mosaic_gpu.block_attention, inputs)
  reference = run(core.block_attention, inputs)
  errors = compare(name, result, reference)
  # Gradients of the sink keys sum over every query row, so 16-bit rounding (of o, from
  # which both sides take delta) adds up there: judge both against float32 inputs, and
  # accept kernel errors up to twice the 16-bit reference's own.
  inputs32 = {n: x.astype(jnp.float32) if x.dtype == dtype else x for n, x in inputs.items()}
  reference32 = run(core.block_attention, inputs32)
  print("  against float32 inputs, the kernels and then the reference:")
  kernel32 = compare(name, result, reference32)
  ref32 = compare(name, reference, reference32)
  ok = all(err < tol or err <= 2 * ref32[path] for path, err in kernel32.items())
  print(f"  {'PASS' if ok else 'FAIL'}", flush=True)
  return dict(errors=errors, errors_vs_f32=kernel32, reference_errors_vs_f32=ref32, ok=ok)


def check_end_to_end(name, *, seq, heads, causal, seed, tol, implementation="mosaic_gpu",
                     kv_heads=None, head_dim=128, config=None):
  """hyper_attention with mosaic_gpu (or the default dispatch) against xla: same samples."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q_shape = (1, seq, heads, head_dim)
  kv_shape = (1, seq, kv_heads or heads, head_dim)
  q = _normal(keys[0], q_shape, jnp.bfloat16)
  k, v = (_normal(key, kv_shape, jnp.bfloat16) for key in keys[1:3])
  d_out = _normal(keys[3], q_shape, jnp.bfloat16)

  def run(implementation):
    @jax.jit
    def go(q, k, v):
      attend = lambda q, k, v: ha.hyper_attention(q, k, v, rng=jax.random.key(7),
                                                  is_causal=causal, config=config,
                                                  implementation=implementation)
      out, vjp = jax.vjp(attend, q, k, v)
      return out, vjp(d_out)
    return go(q, k, v)

  print(f"[{name}] hyper_attention seq={seq} heads={heads}/{kv_heads or heads} d={head_dim} "
        f"causal={causal} {config or ha.HyperAttentionConfig()}", flush=True)
  errors = compare(name, run(implementation), run("xla"))
  ok = max(errors.values()) < tol
  print(f"  {'PASS' if ok else 'FAIL'}", flush=True)
  return dict(errors=errors, ok=ok)


def main(argv):
  del argv
  print(f"jax {jax.__version__}; devices {jax.devices()}; "
        f"compute capability {getattr(jax.devices()[0], 'compute_capability', None)}")
  print(f"available implementations: {ha.available_implementations()}", flush=True)
  tol = 2e-2
  lsh = lambda **kw: core.BlockSpec(diagonal_keys=core.NONLOCAL, extra_keys=core.NONLOCAL,
                                    sink_size=4, **kw)
  cases = {
      "lsh_d128_bf16": lambda: check_primitive(
          "lsh_d128_bf16", lsh_inputs(1, q_heads=32, kv_heads=32, num_blocks=64, block_q=256,
                                      block_k=256, dk=128, dv=128, num_extra=256,
                                      dtype=jnp.bfloat16),
          lsh(block_q=256, block_k=256), 1 / np.sqrt(128), 1, tol),
      "lsh_gqa_d64_fp16": lambda: check_primitive(
          "lsh_gqa_d64_fp16", lsh_inputs(2, q_heads=16, kv_heads=4, num_blocks=32, block_q=256,
                                         block_k=256, dk=64, dv=64, num_extra=256,
                                         dtype=jnp.float16),
          lsh(block_q=256, block_k=256), 1 / 8, 2, tol),
      "lsh_d256_bf16": lambda: check_primitive(
          "lsh_d256_bf16", lsh_inputs(3, q_heads=8, kv_heads=8, num_blocks=16, block_q=256,
                                      block_k=256, dk=256, dv=256, num_extra=256,
                                      dtype=jnp.bfloat16),
          lsh(block_q=256, block_k=256), 1 / 16, 3, tol),
      "cross_odd_dk128_dv64": lambda: check_primitive(
          "cross_odd_dk128_dv64", lsh_inputs(4, q_heads=8, kv_heads=2, num_blocks=40,
                                             block_q=200, block_k=300, dk=128, dv=64,
                                             num_extra=200, dtype=jnp.bfloat16),
          lsh(block_q=200, block_k=300, window_size=0), 1 / np.sqrt(128), 4, tol),
      "lsh_window_d128_bf16": lambda: check_primitive(
          "lsh_window_d128_bf16", lsh_inputs(5, q_heads=16, kv_heads=4, num_blocks=32,
                                             block_q=256, block_k=256, dk=128, dv=128,
                                             num_extra=256, dtype=jnp.bfloat16),
          lsh(block_q=256, block_k=256, window_size=1024), 1 / np.sqrt(128), 5, tol),
      "leaves_4096": lambda: check_local(
          "leaves_4096", heads=8, seq=16384, block=4096, causal=True, sink_size=4,
          window_size=0, dtype=jnp.bfloat16, seed=5, tol=tol),
      "leaves_window_odd": lambda: check_local(
          "leaves_window_odd", heads=8, seq=10000, block=2500, causal=True, sink_size=4,
          window_size=300, dtype=jnp.bfloat16, seed=6, tol=tol),
      "local_noncausal": lambda: check_local(
          "local_noncausal", heads=8, seq=16384, block=256, causal=False, sink_size=4,
          window_size=0, dtype=jnp.bfloat16, seed=7, tol=tol),
      "end_to_end_causal": lambda: check_end_to_end(
          "end_to_end_causal", seq=16384, heads=8, causal=True, seed=8, tol=tol),
      "end_to_end_noncausal": lambda: check_end_to_end(
          "end_to_end_noncausal", seq=16384, heads=8, causal=False, seed=9, tol=tol),
      "end_to_end_gemma_window": lambda: check_end_to_end(
          "end_to_end_gemma_window", seq=32768, heads=4, kv_heads=1, head_dim=256,
          causal=True, seed=11, tol=tol,
          config=ha.HyperAttentionConfig(window_size=1024, block_size=512, min_seq_len=8192)),
      "end_to_end_exact_4096": lambda: check_end_to_end(
          "end_to_end_exact_4096", seq=4096, heads=8, causal=True, seed=10, tol=tol,
          implementation=None),
  }
  selected = _CASES.value or list(cases)
  results = {}
  for name in selected:
    try:
      results[name] = cases[name]()
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {name}: ERROR {type(e).__name__}: {str(e)[:2000]}", flush=True)
      results[name] = dict(ok=False, error=f"{type(e).__name__}: {str(e)[:4000]}")
  print("\nsummary:")
  for name, result in results.items():
    print(f"  {name:24s} {'PASS' if result['ok'] else 'FAIL'}")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(dict(devices=str(jax.devices()), results=results), f, indent=1)


if __name__ == "__main__":
  app.run(main)
