"""Flax attention masks as HyperAttention arguments.

HyperAttention never forms the attention matrix, so it cannot apply an arbitrary boolean
mask. It represents the masks Flax models build in practice (``nn.make_causal_mask``,
``nn.make_attention_mask`` on a padding indicator, and their ``combine_masks``), which all
have the form

  mask[b, h, i, j] = query_valid[b, i] & (j < kv_length[b]) & (not causal or j <= i)

for every head ``h``: a causal flag, a number of valid keys per batch row (the keys form a
prefix) and a set of query rows that see no key at all (padding queries; their output is
zero). ``fit_mask`` recovers that structure and says whether the mask has it.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MaskFit(NamedTuple):
  """A mask written as the structure above.

  Attributes:
    key_value_seq_lengths: ``[batch]`` int32: keys at positions ``>=`` it are masked.
    query_valid: ``[batch, q_len]`` bool: query rows that see at least one key.
    matches: bool scalar: whether the structure reproduces the mask exactly.
  """

  key_value_seq_lengths: jax.Array
  query_valid: jax.Array
  matches: jax.Array


def fit_mask(mask, *, causal: bool, assume_causal: bool) -> MaskFit:
  """Fits ``mask`` with the structure of the module docstring.

  Works on concrete and traced masks alike (jnp only).

  Args:
    mask: ``[batch, heads | 1, q_len, kv_len]`` bool.
    causal: fit the structure with the causal factor.
    assume_causal: the causal mask applies anyway (``is_causal=True`` was given), so
      only ``mask & causal`` has to be reproduced. With False, the mask itself must be.

  Returns:
    A ``MaskFit``.
  """
  q_len, kv_len = mask.shape[-2:]
  lower = jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None]  # [q_len, kv_len]
  target = mask & lower if assume_causal else mask
  first_head = target[:, 0] & lower if causal else target[:, 0]
  # A key is valid when some query sees it; a query when it sees some key.
  key_valid = jnp.any(first_head, axis=1)
  lengths = jnp.sum(key_valid, axis=-1, dtype=jnp.int32)
  query_valid = jnp.any(first_head, axis=2)
  expected = query_valid[:, :, None] & (jnp.arange(kv_len) < lengths[:, None])[:, None, :]
  if causal:
    expected = expected & lower
  return MaskFit(lengths, query_valid, jnp.all(target == expected[:, None]))

