r"""Per-stage times of hyper_attention on the Mosaic GPU kernels (what limits it, and where).

Each stage of the forward pass runs as its own jitted function on its real inputs, so a
stage's time includes writing its outputs; the sum can exceed the fused whole.
Non-causal: transpose, hash and sort (plan), LSH piece (gathers + kernel + un-sort), the
kernel alone, the exact local part, merge and output. Causal: the leaves, then per level
the rectangles, plan, LSH piece, kernel alone and merge. Kernel rows give TFLOP/s.

  PYTHONPATH=. python3 benchmarks/stages_mosaic_gpu.py --lengths=32768,131072
"""

import functools
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import hyperattention_jax as ha
from hyperattention_jax import core
from hyperattention_jax import lsh
from hyperattention_jax import recursion
from hyperattention_jax import sampling
from hyperattention_jax.exact import positions
from hyperattention_jax.kernels import mosaic_gpu
from hyperattention_jax.local import local_attention
from hyperattention_jax.lsh_attention import lsh_attention, make_plan
from hyperattention_jax.merge import merge_partials

from benchmarks.inputs import lsh_inputs
from benchmarks.timing import median_ms

_LENGTHS = flags.DEFINE_list("lengths", ["32768", "131072"], "Sequence lengths.")
_HEADS = flags.DEFINE_integer("heads", 32, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_CAUSAL = flags.DEFINE_list("causal", ["false", "true"], "Causal settings to profile.")
_BACKWARD = flags.DEFINE_bool("backward", True, "Also time forward+backward of the kernels.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")

CONFIG = ha.HyperAttentionConfig()
BLOCK_ATTENTION = mosaic_gpu.block_attention
# The causal recursion's own reshapes, timed here as stages of their own.
rectangles = recursion._rectangles  # pylint: disable=protected-access
from_rectangles = recursion._from_rectangles  # pylint: disable=protected-access


def _report(rows, name, ms, flops=None):
  extra = f"  {flops / ms / 1e9:7.1f} TFLOP/s" if flops else ""
  print(f"    {name:34s} {ms:9.3f} ms{extra}", flush=True)
  rows[name] = ms


def _kernel_fwd_bwd(inputs, spec, scale):
  diff = {n: inputs[n] for n in ("q", "k", "v", "extra_k", "extra_v")}
  fixed = {n: x for n, x in inputs.items() if n not in diff}

  @jax.jit
  def run(diff):
    def loss(diff):
      out, lse = BLOCK_ATTENTION(**diff, **fixed, spec=spec, scale=scale)
      return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))
    return jax.grad(loss)(diff)

  return lambda: run(diff)


def _kernel_fwd(inputs, spec, scale):
  fn = jax.jit(functools.partial(BLOCK_ATTENTION, spec=spec, scale=scale))
  return lambda: fn(**inputs)


def _lsh_piece_kernel(rows, label, batch, heads, q_len, dim):
  """The LSH-piece kernel alone on random sorted inputs of the real shape."""
  block = CONFIG.block_size
  nb = q_len // block
  inputs = lsh_inputs(0, batch=batch, q_heads=heads, kv_heads=heads,
                                       num_blocks=nb, block_q=block, block_k=block, dk=dim,
                                       dv=dim, num_extra=CONFIG.sample_size,
                                       dtype=jnp.bfloat16)
  spec = core.BlockSpec(block_q=block, block_k=block, diagonal_keys=core.NONLOCAL,
                        extra_keys=core.NONLOCAL, sink_size=CONFIG.sink_size)
  flops = 4 * batch * heads * q_len * (block + CONFIG.sample_size) * dim
  scale = 1 / np.sqrt(dim)
  _report(rows, f"{label} kernel fwd", median_ms(_kernel_fwd(inputs, spec, scale)), flops)
  if _BACKWARD.value:
    _report(rows, f"{label} kernel fwd+bwd",
            median_ms(_kernel_fwd_bwd(inputs, spec, scale)), 3.5 * flops)


def profile_noncausal(n, heads, dim):
  rows = {}
  keys = jax.random.split(jax.random.key(n), 3)
  query, key, value = (jax.random.normal(k, (1, n, heads, dim), jnp.bfloat16) for k in keys)
  scale = 1 / np.sqrt(dim)
  projections = lsh.draw_projections(jax.random.key(1), dim, CONFIG.num_projections)
  total = jax.jit(functools.partial(ha.hyper_attention, implementation="mosaic_gpu"))
  _report(rows, "hyper_attention fwd (whole)", median_ms(total, query, key, value))
  transpose = jax.jit(lambda *x: tuple(jnp.swapaxes(t, 1, 2) for t in x))
  _report(rows, "transpose q, k, v", median_ms(transpose, query, key, value))
  q, k, v = transpose(query, key, value)
  q_pos = positions(1, heads, n)
  k_pos = positions(1, heads, n)
  u = jnp.broadcast_to(sampling.sample_uniforms(jax.random.key(2), heads, CONFIG.sample_size),
                       (1, heads, CONFIG.sample_size))
  plan_fn = jax.jit(lambda q, k: make_plan(q, k, k_pos, None, u, projections))
  _report(rows, "hash + sort (plan)", median_ms(plan_fn, q, k))
  plan = plan_fn(q, k)
  piece = jax.jit(lambda q, k, v, plan: lsh_attention(
      q, k, v, q_pos, k_pos, plan, block_size=CONFIG.block_size, sink_size=CONFIG.sink_size,
      window_size=CONFIG.window_size, scale=scale, block_attention=BLOCK_ATTENTION))
  _report(rows, "LSH piece (gather+kernel+unsort)", median_ms(piece, q, k, v, plan))
  _lsh_piece_kernel(rows, "LSH piece", 1, heads, n, dim)
  out, lse = piece(q, k, v, plan)
  local = jax.jit(lambda q, k, v: local_attention(
      q, k, v, q_pos, k_pos, block_size=max(CONFIG.block_size, CONFIG.window_size),
      causal=False, sink_size=CONFIG.sink_size, window_size=CONFIG.window_size, scale=scale,
      block_attention=BLOCK_ATTENTION))
  _report(rows, "local part (sinks)", median_ms(local, q, k, v))
  local_out, local_lse = local(q, k, v)
  merge = jax.jit(lambda *a: jnp.swapaxes(merge_partials(*a)[0].astype(jnp.bfloat16), 1, 2))
  _report(rows, "merge + cast + transpose", median_ms(merge, out, lse, local_out, local_lse))
  return rows


def profile_causal(n, heads, dim):
  rows = {}
  keys = jax.random.split(jax.random.key(n + 1), 3)
  query, key, value = (jax.random.normal(k, (1, n, heads, dim), jnp.bfloat16) for k in keys)
  scale = 1 / np.sqrt(dim)
  projections = lsh.draw_projections(jax.random.key(1), dim, CONFIG.num_projections)
  total = jax.jit(functools.partial(ha.hyper_attention, is_causal=True,
                                    implementation="mosaic_gpu"))
  _report(rows, "hyper_attention fwd (whole)", median_ms(total, query, key, value))
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (query, key, value))
  depth, leaf = recursion.recursion_depth(n, CONFIG.min_seq_len)
  pos = positions(1, heads, n)
  leaves = jax.jit(lambda q, k, v: local_attention(
      q, k, v, pos, pos, block_size=leaf, causal=True, sink_size=CONFIG.sink_size,
      window_size=CONFIG.window_size, scale=scale, block_attention=BLOCK_ATTENTION))
  flops = 2 * heads * n * leaf * dim
  _report(rows, f"leaves ({n // leaf} x {leaf})", median_ms(leaves, q, k, v), flops)
  if _BACKWARD.value:
    leaves_grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
        leaves(q, k, v)[0].astype(jnp.float32)), argnums=(0, 1, 2)))
    _report(rows, "leaves fwd+bwd", median_ms(leaves_grad, q, k, v), 3.5 * flops)
  out, lse = leaves(q, k, v)
  for level in range(1, depth + 1):
    num_rects = 1 << (level - 1)
    cut = jax.jit(lambda q, k, v, p, r=num_rects: (
        rectangles(q, 1, r), rectangles(k, 0, r), rectangles(v, 0, r), rectangles(p, 1, r),
        rectangles(p, 0, r)))
    _report(rows, f"L{level} rectangles ({num_rects})", median_ms(cut, q, k, v, pos))
    rq, rk, rv, rq_pos, rk_pos = cut(q, k, v, pos)
    u = jnp.broadcast_to(sampling.sample_uniforms(jax.random.key(level), heads,
                                                  CONFIG.sample_size),
                         (num_rects, heads, CONFIG.sample_size))
    rpad = jnp.zeros(rq.shape[:3], bool)
    plan_fn = jax.jit(lambda q, k, k_pos: make_plan(q, k, k_pos, rpad, u, projections))
    _report(rows, f"L{level} hash + sort", median_ms(plan_fn, rq, rk, rk_pos))
    plan = plan_fn(rq, rk, rk_pos)
    piece = jax.jit(lambda q, k, v, q_pos, k_pos, plan: lsh_attention(
        q, k, v, q_pos, k_pos, plan, block_size=CONFIG.block_size, sink_size=CONFIG.sink_size,
        window_size=CONFIG.window_size, scale=scale, block_attention=BLOCK_ATTENTION))
    _report(rows, f"L{level} LSH piece", median_ms(piece, rq, rk, rv, rq_pos, rk_pos, plan))
    rect_out, rect_lse = piece(rq, rk, rv, rq_pos, rk_pos, plan)
    merge = jax.jit(lambda o, l, ro, rl: merge_partials(
        o, l, from_rectangles(ro, 1, 0), from_rectangles(rl, 1, -jnp.inf)))
    _report(rows, f"L{level} merge", median_ms(merge, out, lse, rect_out, rect_lse))
    out, lse = merge(out, lse, rect_out, rect_lse)
  _lsh_piece_kernel(rows, "level piece", 1, heads, n // 2, dim)
  return rows


def main(argv):
  del argv
  print(f"jax {jax.__version__}; {jax.devices()}", flush=True)
  results = {}
  for n in map(int, _LENGTHS.value):
    for causal in (c.lower() == "true" for c in _CAUSAL.value):
      print(f"n={n} causal={causal}", flush=True)
      profile = profile_causal if causal else profile_noncausal
      try:
        results[f"{n}_{'causal' if causal else 'noncausal'}"] = profile(n, _HEADS.value,
                                                                        _HEAD_DIM.value)
      except Exception as e:  # pylint: disable=broad-except
        print(f"  ERROR {type(e).__name__}: {str(e)[:3000]}", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
