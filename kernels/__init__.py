"""Pallas kernels for the core primitive (installed as ``hyperattention_jax.kernels``).

``REGISTRY`` maps an implementation name to a ``KernelBackend``. Every backend's
``block_attention`` has the signature of ``hyperattention_jax.core.block_attention`` and
raises ``NotImplementedError`` (while tracing) for calls it cannot handle, so the
dispatcher can fall back to the next implementation.
"""

from typing import Callable, NamedTuple


class KernelBackend(NamedTuple):
  """A kernel implementation of the core primitive.

  Attributes:
    block_attention: the primitive, same signature as the reference.
    is_available: ``backend_name -> bool``: whether it runs on that JAX backend.
    requirement: what it needs, for error messages (e.g. "a Hopper GPU (sm_90)").
  """

  block_attention: Callable
  is_available: Callable[[str], bool]
  requirement: str


REGISTRY: dict[str, KernelBackend] = {}

# Registered after KernelBackend exists: the backend module imports it.
from hyperattention_jax.kernels import mosaic_tpu as _mosaic_tpu  # pylint: disable=wrong-import-position

REGISTRY["mosaic_tpu"] = _mosaic_tpu.BACKEND

from hyperattention_jax.kernels import mosaic_gpu as _mosaic_gpu  # pylint: disable=wrong-import-position

REGISTRY["mosaic_gpu"] = _mosaic_gpu.BACKEND
