"""The core primitive as Pallas Mosaic TPU kernels (``implementation="mosaic_tpu"``).

Forward, dq and dk/dv kernels under one ``jax.custom_vjp``; on CPU they run in Pallas'
TPU interpret mode (``block_attention(..., interpret=True)``), which is how the tests
check them against ``hyperattention_jax.core.block_attention``.
"""

from hyperattention_jax.kernels import KernelBackend
from hyperattention_jax.kernels.mosaic_tpu.attention import block_attention
from hyperattention_jax.kernels.mosaic_tpu.tiling import BlockSizes, default_block_sizes


def is_available(backend: str) -> bool:
  """Mosaic TPU kernels compile for TPUs only (elsewhere: interpret mode, for tests)."""
  return backend == "tpu"


BACKEND = KernelBackend(block_attention=block_attention, is_available=is_available,
                        requirement="a TPU (Pallas Mosaic TPU kernels)")

__all__ = ["BACKEND", "BlockSizes", "block_attention", "default_block_sizes", "is_available"]
