"""``attention_fn`` adapters: HyperAttention inside Flax's own attention modules.

``flax.linen.MultiHeadDotProductAttention`` and ``flax.nnx.MultiHeadAttention`` compute
their attention through an ``attention_fn`` hook. ``hyper_attention_fn`` (and its exact
twin ``exact_attention_fn``) plug into that hook unchanged::

    layer = nnx.MultiHeadAttention(
        num_heads=8, in_features=512, decode=False, rngs=nnx.Rngs(0),
        attention_fn=functools.partial(hyper_attention_fn, config=HyperAttentionConfig()))

Masks. HyperAttention never forms the attention matrix, so a mask is turned into
arguments it understands: a causal flag, a number of valid keys per batch row, and the
query rows that see no key (padding queries, whose output is zero). Supported masks are
those of the form

    mask[..., h, i, j] = query_valid[..., i] & (j < kv_length[...]) & (not causal or j <= i)

the same for every head: ``nn.make_causal_mask``, ``nn.make_attention_mask`` of a
right-padded indicator, their ``nn.combine_masks``, and the decoding cache mask.

* A concrete mask (built outside ``jax.jit``) is inspected when the call is traced: its
  causal part is detected, and any other mask raises ``ValueError``.
* A traced mask (built inside ``jax.jit``, the usual case in training) cannot decide how
  the computation is laid out, so the causal part must be declared statically with
  ``is_causal=True``: pass it to ``nnx.MultiHeadAttention.__call__``, or bind it with
  ``functools.partial`` for linen, whose module has no ``is_causal`` argument. The key
  lengths and padding queries are read from the traced mask. With ``check_mask=True``
  (the default) a mask that does not fit raises at run time (a ``JaxRuntimeError``
  carrying the ``ValueError`` message, from a host callback); ``check_mask=False``
  skips that check and its callback.

A query row that sees no key gets a zero output (Flax's own attention gives it the mean
of all values). A dense mask costs ``q_len * kv_len`` memory by itself: at long context,
give the HyperAttention layers ``key_value_seq_lengths`` instead of a padding mask.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from hyperattention_jax.api import hyper_attention
from hyperattention_jax.exact import exact_attention
from hyperattention_jax.flax.masks import fit_mask

SUPPORTED_MASKS = (
    "HyperAttention represents only masks of the form query_valid[i] & (j < kv_length) & "
    "(not causal or j <= i), identical across heads: causal masks, right-padding masks of "
    "keys and queries, and their combinations")


def _mask_error(mask_shape, *, traced: bool, is_causal: bool) -> str:
  hint = ""
  if traced and not is_causal:
    hint = (" A causal mask built under jit needs is_causal=True (for linen, bind it with "
            "functools.partial).")
  return f"{SUPPORTED_MASKS}; the mask of shape {mask_shape} is not.{hint}"


def _raise_unless(matches, *, message):
  if not np.all(matches):
    raise ValueError(message)


def attend(attention, query, key, value, *, mask=None, is_causal: bool = False,
           key_value_seq_lengths=None, check_mask: bool = True):
  """Runs ``attention`` with Flax's conventions: any batch dims and a boolean mask.

  Args:
    attention: ``(query, key, value, *, is_causal, key_value_seq_lengths) -> out`` on
      ``[batch, seq, heads, head_dim]`` arrays (``hyper_attention`` or
      ``exact_attention`` with their options bound).
    query: ``[batch..., q_len, num_heads, head_dim]``.
    key: ``[batch..., kv_len, num_kv_heads, head_dim]``.
    value: ``[batch..., kv_len, num_kv_heads, value_head_dim]``.
    mask: optional bool mask broadcastable to ``[batch..., num_heads, q_len, kv_len]``;
      False masks a (query, key) pair out. See the module docstring for what is supported.
    is_causal: apply a causal mask (on top of ``mask``).
    key_value_seq_lengths: optional ``[batch...]`` ints: keys at positions ``>=`` it are
      padding (combined with the mask's).
    check_mask: check a traced mask at run time.

  Returns:
    ``[batch..., q_len, num_heads, value_head_dim]``.

  Raises:
    ValueError: the mask cannot be represented (at trace time for a concrete mask).
  """
  if np.ndim(query) < 3:
    raise ValueError(f"query must have shape [batch..., q_len, heads, head_dim]; got "
                     f"query.shape={np.shape(query)}.")
  batch_shape = tuple(query.shape[:-3])
  for name, x in (("key", key), ("value", value)):
    if tuple(np.shape(x)[:-3]) != batch_shape:
      raise ValueError(f"{name} must have the batch dims of query {batch_shape}; got "
                       f"{name}.shape={np.shape(x)}.")
  num_batch_dims = len(batch_shape)
  q, k, v = (x.reshape((-1,) + x.shape[-3:]) for x in (query, key, value))  # one batch axis
  q_len, num_heads = q.shape[1:3]
  kv_len = k.shape[1]
  lengths = None
  if key_value_seq_lengths is not None:
    if np.shape(key_value_seq_lengths) != batch_shape:
      raise ValueError(f"key_value_seq_lengths must have the batch shape {batch_shape}; got "
                       f"shape {np.shape(key_value_seq_lengths)}.")
    lengths = jnp.asarray(key_value_seq_lengths, jnp.int32).reshape(q.shape[0])

  query_valid = None
  if mask is not None:
    mask_heads = np.shape(mask)[-3] if np.ndim(mask) >= 3 else 1
    if mask_heads not in (1, num_heads) or np.ndim(mask) > num_batch_dims + 3:
      raise ValueError(f"mask must broadcast to [batch..., num_heads, q_len, kv_len]="
                       f"{batch_shape + (num_heads, q_len, kv_len)}; got mask.shape="
                       f"{np.shape(mask)}.")
    concrete = not isinstance(mask, jax.core.Tracer)
    # A concrete mask is inspected while tracing: evaluate on it even inside jit.
    with jax.ensure_compile_time_eval() if concrete else contextlib.nullcontext():
      try:
        full = jnp.broadcast_to(jnp.asarray(mask, jnp.bool_),
                                batch_shape + (mask_heads, q_len, kv_len))
      except ValueError as e:
        raise ValueError(f"mask.shape={np.shape(mask)} does not broadcast to "
                         f"{batch_shape + (mask_heads, q_len, kv_len)}.") from e
      full = full.reshape((q.shape[0], mask_heads, q_len, kv_len))
      fit = fit_mask(full, causal=is_causal, assume_causal=is_causal)
      if concrete and not fit.matches and not is_causal and q_len == kv_len:
        causal_fit = fit_mask(full, causal=True, assume_causal=False)
        if causal_fit.matches:
          is_causal, fit = True, causal_fit
    if concrete:
      if not fit.matches:
        raise ValueError(_mask_error(np.shape(mask), traced=False, is_causal=is_causal))
      mask_lengths = None if np.all(fit.key_value_seq_lengths == kv_len) else (
          fit.key_value_seq_lengths)
      query_valid = None if np.all(fit.query_valid) else fit.query_valid
    else:
      if check_mask:
        message = _mask_error(np.shape(mask), traced=True, is_causal=is_causal)
        jax.debug.callback(lambda matches: _raise_unless(matches, message=message),
                           fit.matches)
      mask_lengths, query_valid = fit.key_value_seq_lengths, fit.query_valid
    if mask_lengths is not None:
      lengths = mask_lengths if lengths is None else jnp.minimum(lengths, mask_lengths)

  out = attention(q, k, v, is_causal=is_causal, key_value_seq_lengths=lengths)
  if query_valid is not None:
    out = jnp.where(query_valid[:, :, None, None], out, jnp.zeros((), out.dtype))
  return out.reshape(batch_shape + out.shape[1:])


def default_key_value(inputs_q, inputs_k, inputs_v):
  """Flax's defaults: ``inputs_k`` is ``inputs_q`` and ``inputs_v`` is ``inputs_k`` when None."""
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError("inputs_k cannot be None when inputs_v is given.")
    inputs_k = inputs_q
  return inputs_k, inputs_k if inputs_v is None else inputs_v


def head_dim(qkv_features: int, num_heads: int, num_kv_heads: int) -> int:
  """Per-head features of a multi-head layer, after checking the head counts."""
  if qkv_features % num_heads:
    raise ValueError(f"qkv_features={qkv_features} must be divisible by num_heads={num_heads}.")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} must be a multiple of "
                     f"num_kv_heads={num_kv_heads}.")
  return qkv_features // num_heads


def check_unsupported_call(*, sow_weights: bool = False, decode: bool | None = None):
  """Rejects call options of Flax's attention layers that HyperAttention cannot honour."""
  if sow_weights:
    raise ValueError("HyperAttention never forms the attention weights, so it cannot sow "
                     "them; call the layer with sow_weights=False.")
  if decode:
    raise ValueError("decode=True (an autoregressive cache) is not supported by the "
                     "HyperAttention layer; use nnx.MultiHeadAttention with "
                     "attention_fn=hyper_attention_fn for cached decoding.")


def _flax_hook_checks(*, bias, dropout_rate, deterministic, module, dtype, query, key, value,
                      unused_kwargs):
  """Checks what Flax's modules pass to ``attention_fn``; returns q, k, v in one dtype."""
  if unused_kwargs.get("input_positions") is not None:
    raise ValueError("input_positions was given, which asks the attention function to apply "
                     "rotary embeddings; HyperAttention does not. Rotate the queries and keys "
                     "before attention instead.")
  if bias is not None:
    raise ValueError("HyperAttention cannot add an attention bias; got a bias of shape "
                     f"{np.shape(bias)}. Use a mask of a supported form instead.")
  if dropout_rate > 0.0 and not deterministic:
    raise ValueError(f"HyperAttention never forms the attention weights, so attention "
                     f"dropout is not supported; got dropout_rate={dropout_rate} with "
                     f"deterministic=False. Set dropout_rate=0.0 on the layer.")
  check_unsupported_call(sow_weights=module is not None)
  dtype = jnp.result_type(query, key, value) if dtype is None else dtype
  return tuple(jnp.asarray(x, dtype) for x in (query, key, value))


def hyper_attention_fn(query, key, value, *, bias=None, mask=None, is_causal: bool = False,
                       rng=None, config=None, projections=None, implementation=None,
                       check_mask: bool = True, dropout_rate: float = 0.0,
                       deterministic: bool = False, dtype=None, precision=None, module=None,
                       **unused_kwargs):
  """HyperAttention with the signature of Flax's ``dot_product_attention``.

  A drop-in ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention`` and
  ``flax.nnx.MultiHeadAttention``; bind the HyperAttention options with
  ``functools.partial``. Without ``rng`` the hyperplanes and samples come from a fixed
  key, so the layer is deterministic; without ``projections`` the hyperplanes are drawn
  from ``rng``. For hyperplanes stored with the layer's parameters, use the modules of
  ``hyperattention_jax.flax.nnx`` / ``.linen`` instead.

  Args:
    query: ``[batch..., q_len, num_heads, head_dim]``.
    key: ``[batch..., kv_len, num_kv_heads, head_dim]``.
    value: ``[batch..., kv_len, num_kv_heads, value_head_dim]``.
    bias: must be None (an additive bias cannot be represented).
    mask: bool mask broadcastable to ``[batch..., num_heads, q_len, kv_len]`` of a
      supported form (see the module docstring).
    is_causal: causal self-attention.
    rng: PRNG key for the hyperplanes (without ``projections``) and the samples.
    config: a ``HyperAttentionConfig``.
    projections: ``[head_dim, num_projections]`` LSH hyperplanes.
    implementation: as in ``hyper_attention``.
    check_mask: check a traced mask at run time (see the module docstring).
    dropout_rate: must be 0 unless ``deterministic`` (no attention dropout).
    deterministic: with ``dropout_rate``, as in Flax.
    dtype: the computation dtype; query/key/value's common dtype when None.
    precision: ignored; logits are computed in float32 at the highest precision.
    module: must be None (the weights are never formed, so they cannot be sown).
    **unused_kwargs: other arguments of Flax's hook (``dropout_rng``,
      ``broadcast_dropout``, ``promote_dtype``, ...), ignored; except
      ``input_positions`` (rotary embeddings, not applied here), which must be None.

  Returns:
    ``[batch..., q_len, num_heads, value_head_dim]``.

  Example:
    >>> layer = nn.MultiHeadDotProductAttention(
    ...     num_heads=4, attention_fn=functools.partial(hyper_attention_fn, is_causal=True))
    >>> x = jnp.ones((2, 8192, 64))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> layer.apply(variables, x).shape
    (2, 8192, 64)
  """
  del precision
  q, k, v = _flax_hook_checks(bias=bias, dropout_rate=dropout_rate,
                              deterministic=deterministic, module=module, dtype=dtype,
                              query=query, key=key, value=value, unused_kwargs=unused_kwargs)
  attention = functools.partial(hyper_attention, rng=rng, config=config, projections=projections,
                                implementation=implementation)
  return attend(attention, q, k, v, mask=mask, is_causal=is_causal, check_mask=check_mask)


def exact_attention_fn(query, key, value, *, bias=None, mask=None, is_causal: bool = False,
                       check_mask: bool = True, dropout_rate: float = 0.0,
                       deterministic: bool = False, dtype=None, precision=None, module=None,
                       **unused_kwargs):
  """Memory-efficient exact attention with the signature of Flax's ``dot_product_attention``.

  The exact twin of ``hyper_attention_fn``: same masks, same checks, but every key
  counts (``exact_attention``). Useful as a long-context baseline, since it never
  holds an ``[q_len, kv_len]`` matrix.

  Args:
    query, key, value, bias, mask, is_causal, check_mask, dropout_rate, deterministic,
    dtype, precision, module, **unused_kwargs: as in ``hyper_attention_fn``.

  Returns:
    ``[batch..., q_len, num_heads, value_head_dim]``.

  Example:
    >>> layer = nnx.MultiHeadAttention(num_heads=4, in_features=64, decode=False,
    ...                                attention_fn=exact_attention_fn, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 16, 64)), is_causal=True).shape
    (2, 16, 64)
  """
  del precision
  q, k, v = _flax_hook_checks(bias=bias, dropout_rate=dropout_rate,
                              deterministic=deterministic, module=module, dtype=dtype,
                              query=query, key=key, value=value, unused_kwargs=unused_kwargs)
  return attend(exact_attention, q, k, v, mask=mask, is_causal=is_causal, check_mask=check_mask)
