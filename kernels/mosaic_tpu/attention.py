"""The Mosaic TPU core primitive: padding to tiles, the kernels under ``jax.custom_vjp``.

``block_attention`` has the signature and semantics of
``hyperattention_jax.core.block_attention``. It pads every logical block to whole tiles
(``tiling.plan_tiles``), lays the per-position vectors out as sublane-replicated rows,
and runs the forward kernel; the VJP runs the dq kernel and the dk/dv kernels of the
diagonal and the extra keys. Gradients flow to q, k, v, the extra keys and values, the
scale and the extra bias; positions and blocks are integers.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hyperattention_jax import core
from hyperattention_jax.kernels.mosaic_tpu import backward
from hyperattention_jax.kernels.mosaic_tpu import forward as forward_kernel
from hyperattention_jax.kernels.mosaic_tpu import tiling
from hyperattention_jax.kernels.mosaic_tpu.tiling import NUM_SUBLANES, BlockSizes, TilePlan

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Larger head dims would leave too little VMEM for useful tiles.
MAX_HEAD_DIM = 512


class _Static(NamedTuple):
  spec: core.BlockSpec
  plan: TilePlan
  vmem_limit_bytes: int | None
  interpret: Any


def _kernel_options(static: _Static):
  return dict(spec=static.spec, plan=static.plan, vmem_limit_bytes=static.vmem_limit_bytes,
              interpret=static.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _padded_attention(static, q, k, v, extra_k, extra_v, scale, bias, q_rows, k_rows,
                      extra_rows, extra_block_rows):
  return forward_kernel.forward(q, k, v, extra_k, extra_v, scale, bias, q_rows, k_rows,
                                extra_rows, extra_block_rows, **_kernel_options(static))


def _padded_attention_fwd(static, q, k, v, extra_k, extra_v, scale, bias, q_rows, k_rows,
                          extra_rows, extra_block_rows):
  out, lse_rows = _padded_attention(static, q, k, v, extra_k, extra_v, scale, bias, q_rows,
                                    k_rows, extra_rows, extra_block_rows)
  residuals = (q, k, v, extra_k, extra_v, scale, bias, q_rows, k_rows, extra_rows,
               extra_block_rows, out, lse_rows)
  return (out, lse_rows), residuals


def _padded_attention_bwd(static, residuals, cotangents):
  (q, k, v, extra_k, extra_v, scale, bias, q_rows, k_rows, extra_rows, extra_block_rows, out,
   lse_rows) = residuals
  d_out, d_lse_rows = cotangents
  # Only row 0 of the lse rows leaves this function, but summing is right whatever is read.
  d_lse = jnp.sum(d_lse_rows, axis=2)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
  delta_rows = _as_rows(delta)
  options = _kernel_options(static)
  plan = static.plan

  dq, dscale_parts, dbias_parts = backward.dq_call(
      q, k, v, extra_k, extra_v, scale, bias, q_rows, k_rows, extra_rows, extra_block_rows,
      lse_rows, delta_rows, d_out, **options)
  dk, dv = backward.dkv_call(q, k, v, scale, bias, q_rows, k_rows, lse_rows, delta_rows, d_out,
                             is_extra=False, **options)
  d_scale = jnp.sum(dscale_parts[..., 0, 0]).reshape(scale.shape)
  if plan.has_extra:
    d_extra_k, d_extra_v = backward.dkv_call(
        q, extra_k, extra_v, scale, bias, q_rows, extra_rows, lse_rows, delta_rows, d_out,
        extra_block_rows, is_extra=True, **options)
    d_bias = jnp.sum(dbias_parts[..., 0, 0], axis=(1, 2))
  else:
    d_extra_k, d_extra_v = jnp.zeros_like(extra_k), jnp.zeros_like(extra_v)
    d_bias = jnp.zeros_like(bias)
  return (dq, dk, dv, d_extra_k, d_extra_v, d_scale, d_bias, None, None, None, None)


_padded_attention.defvjp(_padded_attention_fwd, _padded_attention_bwd)


def _as_rows(x):
  """``[..., n]`` -> ``[..., 8, n]``: the vector repeated on the 8 sublanes."""
  return jnp.broadcast_to(jnp.expand_dims(x, -2), x.shape[:-1] + (NUM_SUBLANES, x.shape[-1]))


def _pad_blocks(x, num_blocks: int, block: int, padded: int, axis: int, value=0):
  """Pads each of the ``num_blocks`` blocks along ``axis`` from ``block`` to ``padded`` rows."""
  if block == padded:
    return x
  shape = x.shape[:axis] + (num_blocks, block) + x.shape[axis + 1:]
  pad = [(0, 0)] * (x.ndim + 1)
  pad[axis + 1] = (0, padded - block)
  x = jnp.pad(x.reshape(shape), pad, constant_values=value)
  return x.reshape(x.shape[:axis] + (num_blocks * padded,) + x.shape[axis + 2:])


def _unpad_blocks(x, num_blocks: int, block: int, padded: int, axis: int):
  """Inverse of ``_pad_blocks``."""
  if block == padded:
    return x
  x = x.reshape(x.shape[:axis] + (num_blocks, padded) + x.shape[axis + 1:])
  x = jax.lax.slice_in_dim(x, 0, block, axis=axis + 1)
  return x.reshape(x.shape[:axis] + (num_blocks * block,) + x.shape[axis + 2:])


def _pad_axis(x, size: int, axis: int, value=0):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def plan_call(q, k, v, extra_k, extra_pos, *, spec: core.BlockSpec,
              block_sizes: BlockSizes) -> TilePlan:
  """Tiles of a call, or NotImplementedError (while tracing) for calls the kernels skip."""
  batch, q_heads, q_len, dk = q.shape
  kv_heads, kv_len, dv = k.shape[1], k.shape[2], v.shape[-1]
  num_extra_sets, num_extra = extra_pos.shape[2], extra_pos.shape[3]
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v, extra_k)}
  if len(dtypes) != 1 or dtypes.pop() not in SUPPORTED_DTYPES:
    raise NotImplementedError(
        f"mosaic_tpu supports float32 or bfloat16 q, k, v and extra keys of one dtype; got "
        f"{q.dtype}, {k.dtype}, {v.dtype}, {extra_k.dtype}.")
  if max(dk, dv) > MAX_HEAD_DIM:
    raise NotImplementedError(f"mosaic_tpu supports head dims up to {MAX_HEAD_DIM}; got "
                              f"{dk=}, {dv=}.")
  if min(batch, q_heads, q_len, kv_len, dk, dv) == 0:
    raise NotImplementedError(f"mosaic_tpu needs non-empty inputs; got {q.shape=}, {k.shape=}.")
  if q_heads % kv_heads:
    raise ValueError(f"query heads must be a multiple of key heads; got {q.shape=}, {k.shape=}.")
  if q_len % spec.block_q or kv_len % spec.block_k:
    raise ValueError(f"lengths must be whole blocks; got {q_len=}, {spec.block_q=}, {kv_len=}, "
                     f"{spec.block_k=}.")
  num_blocks = q_len // spec.block_q
  if kv_len // spec.block_k != num_blocks:
    raise ValueError(f"query and key block counts differ: {q_len=} / {spec.block_q=} vs "
                     f"{kv_len=} / {spec.block_k=}.")
  if num_extra and num_extra_sets not in (1, num_blocks):
    raise NotImplementedError(f"extra key sets must be 1 or num_blocks={num_blocks}; got "
                              f"{num_extra_sets}.")
  return tiling.plan_tiles(num_blocks=num_blocks, block_q=spec.block_q, block_k=spec.block_k,
                           groups=q_heads // kv_heads, num_extra=num_extra,
                           num_extra_sets=num_extra_sets, head_dims=(dk, dv),
                           itemsize=jnp.dtype(q.dtype).itemsize, block_sizes=block_sizes)


@core.head_major
def block_attention(q, k, v, q_pos, k_pos, extra_k, extra_v, extra_pos, extra_block, extra_bias,
                    *, spec: core.BlockSpec, scale, block_sizes: BlockSizes | None = None,
                    interpret=False):
  """The core primitive as Mosaic TPU kernels (see ``hyperattention_jax.core``).

  Args:
    q, k, v, q_pos, k_pos, extra_k, extra_v, extra_pos, extra_block, extra_bias, spec,
      scale: as ``hyperattention_jax.core.block_attention``.
    block_sizes: tile bounds; ``tiling.default_block_sizes()`` (per TPU generation) when
      None.
    interpret: False on a TPU. True or a ``pltpu.InterpretParams`` runs the kernels in
      Pallas' TPU interpret mode, on any backend (how the tests check them on CPU).

  Returns:
    ``o [B, Hq, nq, dv]`` in q's dtype and ``lse [B, Hq, nq]`` float32.

  Raises:
    NotImplementedError: while tracing, for calls the kernels do not handle (other
      dtypes, head dims above ``MAX_HEAD_DIM``, empty inputs); the dispatcher then falls
      back to the reference.
  """
  block_sizes = tiling.default_block_sizes() if block_sizes is None else block_sizes
  plan = plan_call(q, k, v, extra_k, extra_pos, spec=spec, block_sizes=block_sizes)
  batch, kv_heads = k.shape[:2]
  nb = plan.num_blocks
  i32 = jnp.int32

  pad_q = functools.partial(_pad_blocks, num_blocks=nb, block=plan.block_q,
                            padded=plan.padded_q, axis=2)
  pad_k = functools.partial(_pad_blocks, num_blocks=nb, block=plan.block_k,
                            padded=plan.padded_k, axis=2)
  q_rows = _as_rows(pad_q(q_pos.astype(i32), value=-1))
  k_rows = _as_rows(pad_k(k_pos.astype(i32), value=-1))
  if plan.has_extra:
    extra_size = plan.extra_padded
    extra_k = _pad_axis(extra_k, extra_size, 3)
    extra_v = _pad_axis(extra_v, extra_size, 3)
    extra_rows = _as_rows(_pad_axis(extra_pos.astype(i32), extra_size, 3, value=-1))
    extra_block_rows = _as_rows(_pad_axis(extra_block.astype(i32), extra_size, 3, value=-1))
  else:  # nothing to read; the kernels take no extra operands
    extra_rows = extra_block_rows = jnp.zeros((batch, kv_heads, 1, NUM_SUBLANES, 0), i32)

  static = _Static(spec=spec, plan=plan, vmem_limit_bytes=block_sizes.vmem_limit_bytes,
                   interpret=interpret)
  out, lse_rows = _padded_attention(
      static, pad_q(q), pad_k(k), pad_k(v), extra_k, extra_v,
      jnp.asarray(scale, jnp.float32).reshape(1), jnp.asarray(extra_bias, jnp.float32),
      q_rows, k_rows, extra_rows, extra_block_rows)
  unpad_q = functools.partial(_unpad_blocks, num_blocks=nb, block=plan.block_q,
                              padded=plan.padded_q, axis=2)
  return unpad_q(out), unpad_q(lse_rows[:, :, 0])
