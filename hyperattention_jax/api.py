"""The public entry point and the choice of core-primitive implementation."""

import functools

import jax
import jax.numpy as jnp

from hyperattention_jax import core
# Imported with the package, never first inside a trace: the kernel modules register JAX
# config options, which would otherwise change the jit cache key between a user's first
# and second call and compile their function twice.
from hyperattention_jax import kernels
from hyperattention_jax import lsh
from hyperattention_jax import validation
from hyperattention_jax.config import HyperAttentionConfig
from hyperattention_jax.exact import exact_attention_bhnd, positions
from hyperattention_jax.recursion import causal_attention, noncausal_attention

# Tried in this order when ``implementation=None``; "xla" (the pure-JAX reference) runs anywhere.
IMPLEMENTATIONS = ("mosaic_gpu", "mosaic_tpu", "xla")

_DEFAULT_SEED = 0
_PROJECTION_STREAM = 0
_SAMPLE_STREAM = 1


def _kernel_registry():
  return kernels.REGISTRY


def available_implementations(backend: str | None = None):
  """Names of the implementations that can run on ``backend`` (default: JAX's), best first."""
  backend = backend or jax.default_backend()
  registry = _kernel_registry()
  names = [name for name in IMPLEMENTATIONS[:-1]
           if name in registry and registry[name].is_available(backend)]
  return tuple(names) + ("xla",)


def _check_implementation(implementation):
  if implementation is None:
    return
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is unknown; choose one of "
                     f"{IMPLEMENTATIONS} or None.")
  backend = jax.default_backend()
  if implementation not in available_implementations(backend):
    registry = _kernel_registry()
    reason = (registry[implementation].requirement if implementation in registry
              else "it is not part of this build")
    raise ValueError(f"implementation={implementation!r} cannot run on the default backend "
                     f"{backend!r}: {reason}.")


def block_attention_for(implementation: str | None):
  """The core primitive for ``implementation``.

  With ``None``, candidates are tried best first: a kernel that cannot handle a call
  raises ``NotImplementedError`` while tracing and the next one is used. A named
  implementation is used as is.
  """
  if implementation == "xla":
    return core.block_attention
  registry = _kernel_registry()
  if implementation is not None:
    return registry[implementation].block_attention
  candidates = [registry[name].block_attention for name in available_implementations()[:-1]]

  def dispatch(*args, **kwargs):
    for candidate in candidates:
      try:
        return candidate(*args, **kwargs)
      except NotImplementedError:
        continue
    return core.block_attention(*args, **kwargs)

  return dispatch


def _exact_on_hopper(query, key, value, *, is_causal, scale, config, implementation,
                     key_value_seq_lengths, return_lse):
  """cuDNN's exact attention on Hopper where the result is exact attention anyway
  (short inputs) or, with automatic dispatch, below the break-even length; else None."""
  if implementation not in (None, "mosaic_gpu") or "mosaic_gpu" not in available_implementations():
    return None
  from hyperattention_jax.kernels.mosaic_gpu import exact  # pylint: disable=import-outside-toplevel
  if not exact.cudnn_applies(query, key, value, is_causal=is_causal, scale=scale,
                             key_value_seq_lengths=key_value_seq_lengths, return_lse=return_lse):
    return None
  q_len, kv_len = query.shape[1], key.shape[1]
  exact_anyway = q_len <= config.min_seq_len or config.block_size >= kv_len
  if not exact_anyway and not (implementation is None
                               and exact.prefers_exact(q_len, is_causal=is_causal)):
    return None
  return exact.cudnn_attention(query, key, value, is_causal=is_causal, scale=float(scale))


@functools.partial(jax.jit, static_argnames=("is_causal", "config", "implementation",
                                             "return_lse"))
def _hyper_attention(query, key, value, rng, scale, projections, key_value_seq_lengths,
                     kv_head_offset=0, *, is_causal, config, implementation, return_lse):
  batch, q_len, q_heads, head_dim = query.shape
  kv_len = key.shape[1]
  if projections is None:
    projections = lsh.draw_projections(jax.random.fold_in(rng, _PROJECTION_STREAM), head_dim,
                                       config.num_projections)
  q_pos = positions(batch, q_heads, q_len)
  k_pos = positions(batch, key.shape[2], kv_len, key_value_seq_lengths)

  if q_len <= config.min_seq_len or config.block_size >= kv_len:
    out, lse = exact_attention_bhnd(*(jnp.swapaxes(x, 1, 2) for x in (query, key, value)),
                                    q_pos, k_pos, causal=is_causal, scale=scale)
    out = jnp.swapaxes(out, 1, 2)
  else:
    if q_len == kv_len:  # self-attention: padding query rows sort after the others
      lengths = kv_len if key_value_seq_lengths is None else key_value_seq_lengths
      q_is_padding = q_pos >= jnp.asarray(lengths, jnp.int32).reshape(-1, 1, 1)
    else:
      q_is_padding = None
    attend = causal_attention if is_causal else noncausal_attention
    out, lse = attend(query, key, value, q_pos, k_pos, q_is_padding,
                      sample_rng=jax.random.fold_in(rng, _SAMPLE_STREAM),
                      projections=projections, config=config, scale=scale,
                      block_attention=block_attention_for(implementation),
                      kv_head_offset=kv_head_offset)
  out = out.astype(query.dtype)
  return (out, lse) if return_lse else out


def hyper_attention(query, key, value, *, rng=None, is_causal=False, scale=None, config=None,
                    projections=None, key_value_seq_lengths=None, implementation=None,
                    return_lse=False):
  """HyperAttention: softmax attention approximated in near-linear time.

  Queries and keys are sorted by angular LSH so that large attention entries gather in
  diagonal blocks, which are computed exactly; the rest is estimated from uniformly
  sampled key columns, and causal masking is handled by recursive splitting (Han et al.,
  "HyperAttention", ICLR 2024). Keys in each query's exact set (the first ``sink_size``
  positions and the ``window_size`` nearest ones) are attended exactly. Short inputs
  (``q_len <= config.min_seq_len``) get exact attention.

  Args:
    query: ``[batch, q_len, num_heads, head_dim]``.
    key: ``[batch, kv_len, num_kv_heads, head_dim]``, ``num_heads % num_kv_heads == 0``.
    value: ``[batch, kv_len, num_kv_heads, value_head_dim]``.
    rng: PRNG key for the hyperplanes (when ``projections`` is None) and the sampled
      columns; the same key gives the same result. None uses a fixed key. The draw
      depends on the key and the head only, never on the batch row.
    is_causal: causal self-attention (``q_len == kv_len``).
    scale: logit scale; ``1 / sqrt(head_dim)`` when None.
    config: a ``HyperAttentionConfig``; the default one when None.
    projections: ``[head_dim, num_projections]`` LSH hyperplanes; drawn from ``rng``
      when None.
    key_value_seq_lengths: optional ``[batch]`` ints; keys at positions ``>=`` the
      length are padding: no weight, never sampled.
    implementation: ``None`` (best for the backend), ``"xla"``, ``"mosaic_gpu"`` or
      ``"mosaic_tpu"``.
    return_lse: also return the log-sum-exp ``[batch, num_heads, q_len]`` float32.

  Returns:
    ``[batch, q_len, num_heads, value_head_dim]`` in query's dtype (and the lse).

  Differentiable in reverse mode (``jax.grad``, ``jax.vjp``) with respect to query, key and
  value; the sampled columns and the sort are constants of the differentiation.
  Forward mode (``jax.jvp``, ``jax.jacfwd``) is not supported: the row moves into and out
  of sorted order (and the kernels) are ``jax.custom_vjp`` functions.

  Example:
    >>> rng = jax.random.key(0)
    >>> q = k = v = jax.random.normal(rng, (1, 8192, 4, 64))
    >>> out = hyper_attention(q, k, v, rng=rng, is_causal=True)
    >>> out.shape
    (1, 8192, 4, 64)
  """
  config = HyperAttentionConfig() if config is None else config
  if not isinstance(config, HyperAttentionConfig):
    raise ValueError(f"config must be a HyperAttentionConfig; got {config!r}.")
  scale = validation.check_inputs(query, key, value, is_causal=is_causal, scale=scale,
                                  key_value_seq_lengths=key_value_seq_lengths,
                                  window_size=config.window_size)
  rng = jax.random.key(_DEFAULT_SEED) if rng is None else validation.check_rng(rng)
  if projections is not None:
    validation.check_projections(projections, query.shape[-1], config.num_projections)
  _check_implementation(implementation)
  exact_out = _exact_on_hopper(query, key, value, is_causal=bool(is_causal), scale=scale,
                               config=config, implementation=implementation,
                               key_value_seq_lengths=key_value_seq_lengths,
                               return_lse=bool(return_lse))
  if exact_out is not None:
    return exact_out
  return _hyper_attention(query, key, value, rng, scale, projections, key_value_seq_lengths,
                          is_causal=bool(is_causal), config=config,
                          implementation=implementation, return_lse=bool(return_lse))
