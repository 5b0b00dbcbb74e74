"""The core primitive on Mosaic GPU kernels, under one ``jax.custom_vjp``.

Padding to whole tiles happens outside the custom VJP (autodiff slices the cotangents);
inside it the forward kernel saves ``(o, lse)`` and the backward runs the dq and dk/dv
kernels with the lse cotangent folded into ``delta``. The gradient covers q, k, v, the extra
keys and values, the logit scale and the extra bias; positions and blocks are integers.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hyperattention_jax import core
from hyperattention_jax import lsh
from hyperattention_jax.kernels.mosaic_gpu import backward
from hyperattention_jax.kernels.mosaic_gpu import common
from hyperattention_jax.kernels.mosaic_gpu import forward
from hyperattention_jax.kernels.mosaic_gpu import layout


@dataclasses.dataclass(frozen=True)
class _Static:
  prob: layout.Problem
  fwd_tiles: common.Tiles
  dq_tiles: common.Tiles
  dkv_tiles: common.Tiles
  interpret: Any


def _kernel_operands(static, q, k, v, extra_k, extra_v, extra_bias, scale, positions):
  padded = dict(q=q, k=k, v=v, extra_k=extra_k, extra_v=extra_v, **positions)
  return layout.operands(padded, extra_bias, scale, static.prob)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _padded_attention(static, q, k, v, extra_k, extra_v, extra_bias, scale, positions):
  ops = _kernel_operands(static, q, k, v, extra_k, extra_v, extra_bias, scale, positions)
  return forward.forward(ops, static.prob, static.fwd_tiles, interpret=static.interpret)


def _padded_attention_fwd(static, q, k, v, extra_k, extra_v, extra_bias, scale, positions):
  out, lse = _padded_attention(static, q, k, v, extra_k, extra_v, extra_bias, scale,
                               positions)
  return (out, lse), (q, k, v, extra_k, extra_v, extra_bias, scale, positions, out, lse)


def _padded_attention_bwd(static, residuals, cotangents):
  q, k, v, extra_k, extra_v, extra_bias, scale, positions, out, lse = residuals
  d_out, d_lse = cotangents
  prob = static.prob
  f32 = jnp.float32
  ops = _kernel_operands(static, q, k, v, extra_k, extra_v, extra_bias, scale, positions)
  delta = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1)
  if prob.spec.sequence_major:
    delta = jnp.swapaxes(delta, 1, 2)
  delta = delta - d_lse.astype(f32)
  lse2 = jnp.where(jnp.isfinite(lse), lse * layout.LOG2E, jnp.inf)
  rows = [lse2, delta]
  if prob.needs_positions:
    rows.append(ops["q_pos"])
  q_meta = jnp.stack(rows, axis=-2)
  d_out = d_out.astype(prob.dtype)

  dq, dscale_rows, dbias_rows = backward.dq(ops, d_out, q_meta, prob, static.dq_tiles,
                                            interpret=static.interpret)
  # The interpreter runs CTAs one after another: two ranges still test the split.
  chunks = backward.extra_chunks(prob, static.dkv_tiles,
                                 target_ctas=2 if static.interpret is not None else 264)
  dk, dv, dk_extra, dv_extra = backward.dkv(ops, d_out, q_meta, prob, static.dkv_tiles,
                                            chunks=chunks, interpret=static.interpret)
  # Fixed-order sums of the partial results: the gradient is deterministic.
  dk_extra = jnp.sum(dk_extra, axis=0).astype(extra_k.dtype)
  dv_extra = jnp.sum(dv_extra, axis=0).astype(extra_v.dtype)
  if not prob.num_extra:
    dk_extra, dv_extra = jnp.zeros_like(extra_k), jnp.zeros_like(extra_v)
  d_scale = jnp.sum(dscale_rows).astype(jnp.result_type(scale)).reshape(jnp.shape(scale))
  d_bias = jnp.sum(dbias_rows, axis=(1, 2)).astype(jnp.result_type(extra_bias))
  d_positions = jax.tree.map(lambda _: None, positions)
  return dq, dk, dv, dk_extra, dv_extra, d_bias, d_scale, d_positions


_padded_attention.defvjp(_padded_attention_fwd, _padded_attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gathered_attention(static, q, k, v, extra_k, extra_v, extra_bias, scale, positions):
  """``_padded_attention`` with q, or k and v, or all three given as ``lsh.SortedRows``: the
  forward kernel reads their rows through the index."""
  def source(x):
    if not isinstance(x, lsh.SortedRows):
      return x
    if static.interpret is None:  # the kernel's row copies read zeros past the last row
      return x.source
    # The interpreter's copies read the last row instead: make it a zero row.
    return jnp.concatenate([x.source, jnp.zeros_like(x.source[:1])])

  ops = _kernel_operands(static, source(q), source(k), source(v), extra_k, extra_v, extra_bias,
                         scale, positions)
  q_gathered, kv_gathered = isinstance(q, lsh.SortedRows), isinstance(k, lsh.SortedRows)
  if q_gathered:
    ops["q_rows"] = q.rows
  if kv_gathered:
    ops["k_rows"] = k.rows
  prob = dataclasses.replace(static.prob, q_gathered=q_gathered, kv_gathered=kv_gathered)
  return forward.forward(ops, prob, static.fwd_tiles, interpret=static.interpret)


def _gathered_attention_fwd(static, q, k, v, *args):
  out, lse = _gathered_attention(static, q, k, v, *args)
  return (out, lse), (q, k, v, *args, out, lse)


def _gathered_attention_bwd(static, residuals, cotangents):
  """The backward kernels on the sorted rows; their gradients go back through the index."""
  q, k, v, *rest = residuals
  dense = tuple(lsh.dense(x) for x in (q, k, v))
  grads = _padded_attention_bwd(static, (*dense, *rest), cotangents)

  def back(x, grad):  # the gradient of the source rows: a gather by the inverse map
    if not isinstance(x, lsh.SortedRows):
      return grad
    d_source = lsh.take_rows(grad.reshape(-1, grad.shape[-1]), x.inverse)
    return lsh.SortedRows(d_source, None, None)

  return (*(back(x, g) for x, g in zip((q, k, v), grads[:3])), *grads[3:])


_gathered_attention.defvjp(_gathered_attention_fwd, _gathered_attention_bwd)


def _multiples(fwd_tiles, dq_tiles, dkv_tiles):
  """Padding multiples that suit every kernel: query blocks, key blocks, extra sets."""
  lcm = lambda *xs: int(np.lcm.reduce(np.array(xs)))
  q_multiple = lcm(fwd_tiles.rows_per_cta, dq_tiles.rows_per_cta, dkv_tiles.query_tile)
  k_multiple = lcm(fwd_tiles.key_tile, dq_tiles.key_tile, dkv_tiles.rows_per_cta)
  return q_multiple, k_multiple, k_multiple


class KernelTiles(NamedTuple):
  """Tile sizes of the three kernels of one call (``common.Tiles`` each)."""

  forward: common.Tiles
  dq: common.Tiles
  dkv: common.Tiles


def default_tiles(dk: int, dv: int, causal: bool = False) -> KernelTiles:
  """The tiles ``block_attention`` uses unless told otherwise (``causal``: ``spec.causal``)."""
  return KernelTiles(common.forward_tiles(dk, dv, causal), common.dq_tiles(dk, dv),
                     common.dkv_tiles(dk, dv))


def block_attention(q, k, v, q_pos, k_pos, extra_k, extra_v, extra_pos, extra_block, extra_bias,
                    *, spec: core.BlockSpec, scale, interpret=None,
                    tiles: KernelTiles | None = None):
  """The core primitive as Mosaic GPU kernels (see ``hyperattention_jax.core``).

  Args:
    q, k, v, q_pos, k_pos, extra_k, extra_v, extra_pos, extra_block, extra_bias, spec,
      scale: as ``hyperattention_jax.core.block_attention``. q, or k and v, given as
      ``lsh.SortedRows`` are read row by row through the index by the forward kernel (no
      sorted copy; the backward kernels get copies). A causal ``spec`` needs its blocks in
      original order (query row i and key row i of a block at the same position,
      as ``local.py`` builds the causal leaves): key tiles after a query tile are skipped.
    interpret: None on a Hopper GPU; a ``plgpu.InterpretGPUParams`` runs the kernels in
      Pallas' GPU interpreter on the CPU (how the tests check them).
    tiles: the kernels' tile sizes (``default_tiles`` when None), for tuning them
      (``benchmarks/tune_mosaic_gpu.py``).

  Returns:
    ``o [B, Hq, nq, dv]`` in q's dtype and ``lse [B, Hq, nq]`` float32.

  Raises:
    NotImplementedError: while tracing, for calls the kernels do not handle (dtypes other
      than bfloat16 and float16, head dims other than 64, 128 and 256, positions beyond
      2**24); the dispatcher then falls back to the next implementation.
  """
  if isinstance(k, lsh.SortedRows) != isinstance(v, lsh.SortedRows):
    raise ValueError("k and v must both be lsh.SortedRows or both arrays; got "
                     f"{type(k).__name__} and {type(v).__name__}.")
  if any(isinstance(x, lsh.SortedRows) for x in (q, k)) and spec.sequence_major:
    raise ValueError("rows given as lsh.SortedRows are head-major: "
                     f"spec.sequence_major={spec.sequence_major} must be False.")
  fwd_tiles, dq_tiles, dkv_tiles = tiles or default_tiles(q.shape[-1], v.shape[-1],
                                                          spec.causal)
  q_multiple, k_multiple, extra_multiple = _multiples(fwd_tiles, dq_tiles, dkv_tiles)
  prob = layout.describe(q, k, v, extra_pos, spec=spec, q_multiple=q_multiple,
                         k_multiple=k_multiple, extra_multiple=extra_multiple)
  static = _Static(prob=prob, fwd_tiles=fwd_tiles, dq_tiles=dq_tiles, dkv_tiles=dkv_tiles,
                   interpret=interpret)
  if prob.block_q != spec.block_q:  # blocks padded to whole tiles: copy the rows
    q = lsh.dense(q)
  if prob.block_k != spec.block_k:
    k, v = lsh.dense(k), lsh.dense(v)
  padded = layout.pad(q, k, v, q_pos, k_pos, extra_k, extra_v, extra_pos, extra_block, prob)
  positions = {name: padded[name] for name in ("q_pos", "k_pos", "extra_pos", "extra_block")}
  args = (padded["q"], padded["k"], padded["v"], padded["extra_k"], padded["extra_v"],
          jnp.asarray(extra_bias, jnp.float32), jnp.asarray(scale, jnp.float32), positions)
  if any(isinstance(x, lsh.SortedRows) for x in (q, k)):
    out, lse = _gathered_attention(static, *args)
  else:
    out, lse = _padded_attention(static, *args)
  unpad = functools.partial(layout.unpad_blocks, num_blocks=prob.num_blocks,
                            block=spec.block_q, padded=prob.block_q)
  return unpad(out, axis=prob.seq_axis), unpad(lse)


