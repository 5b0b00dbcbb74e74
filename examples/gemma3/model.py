"""The Gemma 3 270M forward pass in JAX, with pluggable attention per layer.

Conventions of the GGUF checkpoint (see ``weights.py`` for the parameter layout):

* token embeddings are scaled by ``sqrt(d_model)``;
* RMSNorm is ``x / rms(x) * w`` (the GGUF already folds Gemma's ``1 + w`` into ``w``), also
  per head on queries and keys before RoPE;
* RoPE rotates the two halves of each head (not interleaved pairs), with base 1e6 on the
  global layers and 1e4 on the sliding-window ones;
* attention logits are scaled by ``1 / sqrt(256) = 1 / 16``;
* the attention and feed-forward outputs are RMS-normed again before each residual add;
* the feed-forward block is ``down(gelu_tanh(gate(x)) * up(x))``;
* the output projection is the embedding matrix (tied);
* every sixth layer (5, 11, 17) attends globally; the others see the last 512 positions.

Each layer's attention is a callable ``fn(query, key, value, *, scale, rng)`` on
``[batch, seq, heads, head_dim]`` arrays (GQA: ``key``/``value`` have fewer heads), so the
global layers can use ``hyper_attention`` while the local layers stay exact. The callables
below are frozen dataclasses: hashable by value, so a tuple of them is a static ``jit``
argument and equal choices reuse one compilation.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from hyperattention_jax import HyperAttentionConfig, exact_attention, hyper_attention

# Rows of the output projection computed at once: [chunk, vocab] float32 logits are 0.5 GiB
# per batch row at chunk 512, never the whole [seq, vocab] matrix (34 GiB at 32k).
LOGIT_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  """Hyper-parameters of a Gemma 3 text model (defaults: Gemma 3 270M).

  Attributes:
    vocab_size: tokenizer entries (rows of the tied embedding).
    d_model: width of the residual stream.
    num_layers: transformer blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention).
    head_dim: query/key/value width per head.
    ffn_dim: hidden width of the gated feed-forward block.
    rms_eps: epsilon inside every RMSNorm.
    rope_base_global: RoPE base of the global layers.
    rope_base_local: RoPE base of the sliding-window layers (not in the GGUF metadata).
    sliding_window: a local layer's query at ``i`` sees keys ``i - window < j <= i``.
    global_every: layer ``i`` is global when ``(i + 1) % global_every == 0``.
    query_scale: attention logit scale (``query_pre_attn_scalar ** -0.5``).
    context_length: longest sequence the model was trained for.
    bos_id: beginning-of-sequence token, prepended to every input.
    eos_id: end-of-sequence token.
  """

  vocab_size: int = 262_144
  d_model: int = 640
  num_layers: int = 18
  num_heads: int = 4
  num_kv_heads: int = 1
  head_dim: int = 256
  ffn_dim: int = 2048
  rms_eps: float = 1e-6
  rope_base_global: float = 1_000_000.0
  rope_base_local: float = 10_000.0
  sliding_window: int = 512
  global_every: int = 6
  query_scale: float = 1.0 / 16.0
  context_length: int = 32_768
  bos_id: int = 2
  eos_id: int = 1

  @property
  def global_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if (i + 1) % self.global_every == 0)

  def is_global(self, layer: int) -> bool:
    return (layer + 1) % self.global_every == 0


# ----------------------------------------------------------------------------------------
# Attention functions: fn(query, key, value, *, scale, rng) -> [batch, seq, heads, dv].


@dataclasses.dataclass(frozen=True)
class ExactCausalAttention:
  """Exact causal attention over all earlier positions.

  Attributes:
    implementation: ``"chunked"`` (``hyperattention_jax.exact_attention``: online softmax
      over key chunks, never an n x n matrix; runs anywhere) or ``"xla"`` / ``"cudnn"``
      (``jax.nn.dot_product_attention``; cuDNN is the fast GPU baseline, bf16 only).
  """

  implementation: str = "chunked"

  def __call__(self, query, key, value, *, scale, rng=None):
    del rng
    if self.implementation == "chunked":
      return exact_attention(query, key, value, is_causal=True, scale=scale)
    return jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=True,
                                        implementation=self.implementation)


@dataclasses.dataclass(frozen=True)
class SlidingWindowAttention:
  """Exact causal attention over the last ``window`` positions (``i - window < j <= i``).

  Attributes:
    window: positions each query sees, itself included.
    implementation: ``"chunked"`` (``sliding_window_attention`` below) or ``"xla"`` /
      ``"cudnn"`` (``jax.nn.dot_product_attention`` with ``local_window_size``).
  """

  window: int
  implementation: str = "chunked"

  def __call__(self, query, key, value, *, scale, rng=None):
    del rng
    if self.implementation == "chunked":
      return sliding_window_attention(query, key, value, window=self.window, scale=scale)
    return jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=True,
                                        local_window_size=(self.window - 1, 0),
                                        implementation=self.implementation)


@dataclasses.dataclass(frozen=True)
class HyperCausalAttention:
  """Causal ``hyper_attention`` with a fixed configuration.

  Attributes:
    config: the HyperAttention hyper-parameters.
    implementation: passed to ``hyper_attention`` (None: best for the backend).
  """

  config: HyperAttentionConfig = HyperAttentionConfig()
  implementation: str | None = None

  def __call__(self, query, key, value, *, scale, rng=None):
    return hyper_attention(query, key, value, rng=rng, is_causal=True, scale=scale,
                           config=self.config, implementation=self.implementation)


def sliding_window_attention(query, key, value, *, window: int, scale, blocks_per_step: int = 16):
  """Exact causal sliding-window attention in blocks of ``window`` queries.

  A query block ``[s, s + window)`` only sees keys in ``(s - window, s + window)``, so each
  block attends to its own key block and the previous one: memory is linear in the
  sequence length, ``blocks_per_step`` blocks of ``[window, 2 * window]`` logits at a time.

  Args:
    query: ``[batch, seq, heads, head_dim]``.
    key: ``[batch, seq, kv_heads, head_dim]``, ``heads % kv_heads == 0``.
    value: ``[batch, seq, kv_heads, dv]``.
    window: positions each query sees (``i - window < j <= i``).
    scale: logit scale.
    blocks_per_step: query blocks computed together (a memory / speed trade-off).

  Returns:
    ``[batch, seq, heads, dv]`` in query's dtype.
  """
  batch, seq, heads, head_dim = query.shape
  kv_heads, dv = key.shape[2], value.shape[3]
  groups = heads // kv_heads
  num_blocks = -(-seq // window)
  padded = num_blocks * window

  def blocks(x):
    x = jnp.pad(x, [(0, 0), (0, padded - seq)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((batch, num_blocks, window) + x.shape[2:])

  q = blocks(query).reshape(batch, num_blocks, window, kv_heads, groups, head_dim)
  k, v = blocks(key), blocks(value)
  # Keys of block b: block b - 1 then block b (block -1 is zeros, masked below).
  shift = lambda x: jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2))[:, :-1]
  k = jnp.concatenate([shift(k), k], axis=2)
  v = jnp.concatenate([shift(v), v], axis=2)
  offsets = jnp.arange(window)[:, None] + window - jnp.arange(2 * window)[None, :]  # i - j

  def one_block(args):
    q_b, k_b, v_b, block = args
    logits = scale * jnp.einsum("bqhgd,bkhd->bhgqk", q_b, k_b,
                                preferred_element_type=jnp.float32)
    key_pos = block * window - window + jnp.arange(2 * window)
    keep = (offsets >= 0) & (offsets < window) & (key_pos >= 0)[None, :]
    probs = jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v_b.astype(jnp.float32))
    return out.reshape(batch, window, heads, dv).astype(query.dtype)

  out = jax.lax.map(one_block, (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0),
                                jnp.moveaxis(v, 1, 0), jnp.arange(num_blocks)),
                    batch_size=min(blocks_per_step, num_blocks))
  return jnp.moveaxis(out, 0, 1).reshape(batch, padded, heads, dv)[:, :seq]


def layer_attention(config: Gemma3Config, *, hyper_layers=(), hyper_config=None,
                    exact_implementation: str = "chunked", hyper_implementation=None):
  """One attention function per layer: sliding window locally, exact or hyper globally.

  Args:
    config: the model configuration.
    hyper_layers: global layers whose attention becomes causal ``hyper_attention``.
    hyper_config: its ``HyperAttentionConfig`` (the package default when None).
    exact_implementation: implementation of the exact attention (global and local).
    hyper_implementation: ``hyper_attention``'s implementation.

  Returns:
    A tuple of ``config.num_layers`` attention functions, usable as a static argument.
  """
  hyper_layers = tuple(hyper_layers)
  for layer in hyper_layers:
    if not config.is_global(layer):
      raise ValueError(f"hyper_layers must be global layers {config.global_layers}; "
                       f"got {hyper_layers}.")
  hyper = HyperCausalAttention(hyper_config or HyperAttentionConfig(), hyper_implementation)
  exact = ExactCausalAttention(exact_implementation)
  local = SlidingWindowAttention(config.sliding_window, exact_implementation)
  return tuple(
      (hyper if i in hyper_layers else exact) if config.is_global(i) else local
      for i in range(config.num_layers))


# ----------------------------------------------------------------------------------------
# The network.


def rms_norm(x, weight, eps: float):
  """``x / rms(x) * weight`` over the last axis, computed in float32."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, base: float):
  """Rotary embedding of ``x [batch, seq, heads, dim]``, rotating the halves of each head."""
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [seq, half]
  sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def _block(x, p, rng, *, config: Gemma3Config, attention, rope_base: float):
  """One transformer block on the float32 residual stream ``x [batch, seq, d_model]``.

  Returns the new residual stream and the block's ``(q, k, v)`` after norms and RoPE.
  """
  batch, seq, _ = x.shape
  dtype = p["q_proj"].dtype
  eps = config.rms_eps
  positions = jnp.arange(seq)

  h = rms_norm(x, p["attn_norm"], eps).astype(dtype)
  q = (h @ p["q_proj"]).reshape(batch, seq, config.num_heads, config.head_dim)
  k = (h @ p["k_proj"]).reshape(batch, seq, config.num_kv_heads, config.head_dim)
  v = (h @ p["v_proj"]).reshape(batch, seq, config.num_kv_heads, config.head_dim)
  q = rope(rms_norm(q, p["q_norm"], eps), positions, rope_base)
  k = rope(rms_norm(k, p["k_norm"], eps), positions, rope_base)
  o = attention(q, k, v, scale=config.query_scale, rng=rng)
  o = o.reshape(batch, seq, config.num_heads * config.head_dim) @ p["o_proj"]
  x = x + rms_norm(o.astype(jnp.float32), p["post_attn_norm"], eps)

  h = rms_norm(x, p["ffn_norm"], eps).astype(dtype)
  f = jax.nn.gelu(h @ p["gate_proj"], approximate=True) * (h @ p["up_proj"])
  f = f @ p["down_proj"]
  x = x + rms_norm(f.astype(jnp.float32), p["post_ffn_norm"], eps)
  return x, (q, k, v)


def _segments(config: Gemma3Config, attention, capture):
  """Runs of consecutive layers that share one attention function and RoPE base.

  A run becomes one ``lax.scan`` (one compiled block); global and captured layers stand
  alone.
  """
  segments = []
  for i in range(config.num_layers):
    alone = config.is_global(i) or i in capture
    if segments and not alone and not segments[-1][2] and attention[i] == attention[i - 1]:
      segments[-1][1] = i + 1
    else:
      segments.append([i, i + 1, alone])
  return [(start, stop) for start, stop, _ in segments]


def hidden_states(params, tokens, *, config: Gemma3Config, attention, rng=None, capture=()):
  """Final (normed) hidden states of ``tokens``.

  Args:
    params: the parameter pytree (``weights.py``).
    tokens: ``[batch, seq]`` int token ids (start them with ``config.bos_id``).
    config: the model configuration.
    attention: ``config.num_layers`` attention functions (``layer_attention``).
    rng: PRNG key for randomised attention; layer ``i`` gets ``fold_in(rng, i)``.
    capture: layers whose ``(q, k, v)`` to return (after norms and RoPE).

  Returns:
    ``[batch, seq, d_model]`` float32 hidden states, and a dict ``layer -> (q, k, v)``
    with ``q [batch, seq, num_heads, head_dim]``, ``k, v [batch, seq, num_kv_heads,
    head_dim]``.
  """
  if len(attention) != config.num_layers:
    raise ValueError(f"attention must hold num_layers={config.num_layers} functions; "
                     f"got {len(attention)}.")
  rng = jax.random.key(0) if rng is None else rng
  x = params["embed"][tokens].astype(jnp.float32) * math.sqrt(config.d_model)
  captured = {}
  for start, stop in _segments(config, attention, capture):
    base = config.rope_base_global if config.is_global(start) else config.rope_base_local
    block = functools.partial(_block, config=config, attention=attention[start],
                              rope_base=base)
    layer_params = jax.tree.map(lambda a, i=start, j=stop: a[i:j], params["layers"])
    if stop - start == 1:
      x, qkv = block(x, jax.tree.map(lambda a: a[0], layer_params),
                     jax.random.fold_in(rng, start))
      if start in capture:
        captured[start] = qkv
    else:
      def step(x, layer, block=block):
        p, index = layer
        return block(x, p, jax.random.fold_in(rng, index))[0], None
      x, _ = jax.lax.scan(step, x, (layer_params, jnp.arange(start, stop)))
  return rms_norm(x, params["final_norm"], config.rms_eps), captured


def output_logits(params, hidden):
  """Float32 logits ``[..., vocab]`` of hidden states ``[..., d_model]`` (tied embedding)."""
  embed = params["embed"]
  return jnp.einsum("...d,vd->...v", hidden.astype(embed.dtype), embed,
                    preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("config", "attention", "capture"))
def forward(params, tokens, rng=None, *, config: Gemma3Config, attention, capture=()):
  """Logits ``[batch, seq, vocab]`` float32 and the captured ``(q, k, v)`` dict.

  Materialises every position's logits (1 MiB per token): for short inputs; ``token_nll``
  scores long ones.
  """
  hidden, captured = hidden_states(params, tokens, config=config, attention=attention, rng=rng,
                                   capture=capture)
  return output_logits(params, hidden), captured


def next_token_nll(params, hidden, tokens, *, chunk: int = LOGIT_CHUNK):
  """Negative log-likelihood of each next token, without a ``[seq, vocab]`` matrix.

  Args:
    params: the parameter pytree (for the tied output projection).
    hidden: ``[batch, seq, d_model]`` final hidden states of ``tokens``.
    tokens: ``[batch, seq]`` token ids; position ``t`` predicts token ``t + 1``.
    chunk: positions whose logits are computed at once.

  Returns:
    ``[batch, seq - 1]`` float32 ``-log p(tokens[:, t + 1] | tokens[:, :t + 1])``.
  """
  batch, seq = tokens.shape
  n = seq - 1
  chunk = min(chunk, n)
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  h = jnp.pad(hidden[:, :-1], [(0, 0), (0, pad), (0, 0)])
  targets = jnp.pad(tokens[:, 1:], [(0, 0), (0, pad)])

  def one_chunk(args):
    h_c, t_c = args  # [batch, chunk, d_model], [batch, chunk]
    logits = output_logits(params, h_c)
    picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked

  h = jnp.moveaxis(h.reshape(batch, num_chunks, chunk, -1), 1, 0)
  targets = jnp.moveaxis(targets.reshape(batch, num_chunks, chunk), 1, 0)
  nll = jax.lax.map(one_chunk, (h, targets))
  return jnp.moveaxis(nll, 0, 1).reshape(batch, num_chunks * chunk)[:, :n]


@functools.partial(jax.jit, static_argnames=("config", "attention", "capture", "chunk"))
def token_nll(params, tokens, rng=None, *, config: Gemma3Config, attention, capture=(),
              chunk: int = LOGIT_CHUNK):
  """Per-token negative log-likelihood of a token window under a choice of attention.

  Args:
    params, config, attention, rng, capture: as in ``hidden_states``.
    tokens: ``[batch, seq]`` token ids, starting with BOS.
    chunk: as in ``next_token_nll``.

  Returns:
    ``[batch, seq - 1]`` float32 negative log-likelihoods of ``tokens[:, 1:]``, and the
    captured ``(q, k, v)`` dict.
  """
  hidden, captured = hidden_states(params, tokens, config=config, attention=attention, rng=rng,
                                   capture=capture)
  return next_token_nll(params, hidden, tokens, chunk=chunk), captured


def perplexity(nll) -> float:
  """``exp(mean(nll))`` of token negative log-likelihoods."""
  return float(jnp.exp(jnp.mean(jnp.asarray(nll, jnp.float32))))


@functools.partial(jax.jit, static_argnames=("config", "attention"))
def _next_token(params, tokens, position, *, config, attention):
  hidden, _ = hidden_states(params, tokens, config=config, attention=attention)
  last = jax.lax.dynamic_index_in_dim(hidden, position, axis=1, keepdims=False)
  return jnp.argmax(output_logits(params, last), axis=-1)


def greedy_generate(params, prompt, num_tokens: int, *, config: Gemma3Config, attention=None,
                    stop_at_eos: bool = True) -> list[int]:
  """Greedy continuation of ``prompt`` (token ids, starting with BOS).

  The whole sequence is recomputed per token (no KV cache): fine for a few dozen tokens
  as a sanity check. The input has a fixed length, padded after the written tokens (the
  causal mask hides the padding), so it compiles once.

  Returns:
    The ``num_tokens`` (fewer if EOS comes first) generated ids.
  """
  attention = attention or layer_attention(config)
  prompt = [int(t) for t in prompt]
  buffer = jnp.zeros((1, len(prompt) + num_tokens), jnp.int32)
  buffer = buffer.at[0, :len(prompt)].set(jnp.asarray(prompt, jnp.int32))
  generated = []
  for step in range(num_tokens):
    position = len(prompt) + step - 1
    token = int(_next_token(params, buffer, position, config=config, attention=attention)[0])
    generated.append(token)
    if stop_at_eos and token == config.eos_id:
      break
    buffer = buffer.at[0, position + 1].set(token)
  return generated
