"""Exact attention through cuDNN where HyperAttention cannot beat it on Hopper.

``hyper_attention`` computes short inputs exactly (``q_len <= min_seq_len``); on a Hopper
GPU cuDNN's fused attention does that far faster than the chunked pure-JAX exact path.
Above that length HyperAttention still pays for hashing, sorting, gathers and merges, so
up to a break-even length (measured on an H200 with the default configuration; see
``benchmarks/RESULTS.md``) the automatic dispatch computes exact attention with cuDNN too.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Below these query lengths the default dispatch on Hopper is exact (cuDNN). Measured at the
# default configuration (B=1, 32 heads, head_dim 128, bf16, H200; benchmarks/RESULTS.md):
# non-causal, the kernels are 2.4x (forward) and 2.6x (forward+backward) faster at 8192;
# causal, they are 1.78x and 1.69x faster at 16384 but at par at 8192 (1.03x and 1.00x), so
# causal inputs stay exact below 16384.
BREAK_EVEN = {False: 8192, True: 16384}


def _concrete_float(x):
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def cudnn_applies(query, key, value, *, is_causal, scale, key_value_seq_lengths, return_lse):
  """Whether cuDNN's fused attention computes this call exactly as ``exact_attention`` would.

  It needs 16-bit inputs, equal query/key/value head dims (a multiple of 8, at most 256), a
  concrete scale, no key padding lengths (rows with no valid key differ) and no lse.
  """
  dtype = jnp.result_type(query)
  head_dim = np.shape(query)[-1]
  return (not return_lse and key_value_seq_lengths is None
          and dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and jnp.result_type(key) == dtype and jnp.result_type(value) == dtype
          and np.shape(key)[-1] == head_dim == np.shape(value)[-1]
          and head_dim % 8 == 0 and head_dim <= 256
          and (not is_causal or np.shape(query)[1] == np.shape(key)[1])
          and _concrete_float(scale) is not None)


def prefers_exact(q_len: int, *, is_causal: bool) -> bool:
  """Whether automatic dispatch should compute this length exactly (below break-even)."""
  return q_len < BREAK_EVEN[bool(is_causal)]


@jax.jit(static_argnames=("is_causal", "scale"))
def cudnn_attention(query, key, value, *, is_causal: bool, scale: float):
  """Exact attention in ``[batch, seq, heads, head_dim]`` through cuDNN."""
  return jax.nn.dot_product_attention(query, key, value, scale=scale, is_causal=is_causal,
                                      implementation="cudnn")
