"""The core primitive as Pallas Mosaic GPU kernels for Hopper (``implementation="mosaic_gpu"``).

Forward, dq and dk/dv kernels (wgmma, bulk copies, a memory warpgroup feeding the compute
warpgroups) under one ``jax.custom_vjp``. On the CPU they run in Pallas' GPU interpreter
(``block_attention(..., interpret=plgpu.InterpretGPUParams())``), which is how the tests
check them against ``hyperattention_jax.core.block_attention``.
"""

import jax

from hyperattention_jax.kernels import KernelBackend
from hyperattention_jax.kernels.mosaic_gpu.attention import (KernelTiles, block_attention,
                                                              default_tiles)
from hyperattention_jax.kernels.mosaic_gpu.common import Tiles

REQUIREMENT = "an NVIDIA Hopper GPU (compute capability 9.x; Pallas Mosaic GPU kernels)"


def is_available(backend: str) -> bool:
  """True on a GPU backend whose devices all have compute capability 9.x (Hopper)."""
  if backend not in ("gpu", "cuda"):
    return False
  try:
    devices = jax.devices(backend)
  except RuntimeError:
    return False
  return bool(devices) and all(
      str(getattr(device, "compute_capability", "")).split(".")[0] == "9" for device in devices)


BACKEND = KernelBackend(block_attention=block_attention, is_available=is_available,
                        requirement=REQUIREMENT)

__all__ = ["BACKEND", "REQUIREMENT", "KernelTiles", "Tiles", "block_attention", "default_tiles",
           "is_available"]
