"""Exact merge of partial attention results over disjoint key sets."""

import functools

import jax
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
  return merge_all((out_a, out_b), (lse_a, lse_b))


@jax.named_scope("merge")
def merge_all(outs, lses):
  """``merge_partials`` for any number of results over disjoint key sets, in one pass.

  Merging all pieces at once reads each piece once and writes the result once (the
  causal recursion merges ``1 + depth`` pieces per row this way).

  Args:
    outs: sequence of ``[..., n, d]`` outputs (any float dtype).
    lses: sequence of ``[..., n]`` float32 log-sum-exps, one per output.

  Returns:
    ``(out [..., n, d] float32, lse [..., n] float32)``.
  """
  lses = [lse.astype(jnp.float32) for lse in lses]
  top = functools.reduce(jnp.maximum, lses)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = [jnp.exp(lse - top) for lse in lses]
  total = functools.reduce(jnp.add, weights)
  nonempty = total > 0
  safe_total = jnp.where(nonempty, total, 1.0)
  lse = jnp.where(nonempty, top + jnp.log(safe_total), -jnp.inf)
  out = functools.reduce(jnp.add, [(weight / safe_total)[..., None] * piece.astype(jnp.float32)
                                   for weight, piece in zip(weights, outs)])
  return out, lse
