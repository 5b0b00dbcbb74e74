"""Small shape helpers."""

import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
  """Ceiling division of non-negative ints."""
  return -(-a // b)


def pad_axis(x, size: int, axis: int, value=0):
  """Pads ``x`` at the end of ``axis`` up to ``size`` with ``value``."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)
