"""Exact merge of partial attention results over disjoint key sets."""

import jax.numpy as jnp


def merge_partials(out_a, lse_a, out_b, lse_b):
  """Combines two (o, lse) results computed over disjoint key sets.

  ``lse = logaddexp(lse_a, lse_b)`` and ``o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b``,
  in float32 with the larger lse factored out, so pieces that differ by any amount
  merge without saturating. Rows where both lse are ``-inf`` stay ``(0, -inf)`` with
  finite gradients.

  Args:
    out_a, out_b: ``[..., n, d]`` outputs (any float dtype).
    lse_a, lse_b: ``[..., n]`` float32 log-sum-exps.

  Returns:
    ``(out [..., n, d] float32, lse [..., n] float32)``.
  """
  lse_a = lse_a.astype(jnp.float32)
  lse_b = lse_b.astype(jnp.float32)
  top = jnp.maximum(lse_a, lse_b)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weight_a = jnp.exp(lse_a - top)
  weight_b = jnp.exp(lse_b - top)
  total = weight_a + weight_b
  nonempty = total > 0
  safe_total = jnp.where(nonempty, total, 1.0)
  lse = jnp.where(nonempty, top + jnp.log(safe_total), -jnp.inf)
  out = ((weight_a / safe_total)[..., None] * out_a.astype(jnp.float32)
         + (weight_b / safe_total)[..., None] * out_b.astype(jnp.float32))
  return out, lse
