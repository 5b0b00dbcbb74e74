"""HyperAttention for JAX: long-context attention in near-linear time."""

import os as _os

# In a source checkout the Pallas kernels sit in the top-level ``kernels/`` folder; an
# installed package carries them as ``hyperattention_jax/kernels``. Let the checkout's
# folder answer for ``hyperattention_jax.kernels`` when the package is not installed.
_here = _os.path.dirname(__file__)
if not _os.path.isdir(_os.path.join(_here, "kernels")):
  _checkout = _os.path.dirname(_here)
  if _os.path.isfile(_os.path.join(_checkout, "kernels", "__init__.py")):
    __path__.append(_checkout)  # pylint: disable=undefined-variable

from hyperattention_jax.api import available_implementations, hyper_attention
from hyperattention_jax.config import (PAPER_CONFIG, PRESETS, PRETRAINED_LM_CONFIG,
                                       HyperAttentionConfig)
from hyperattention_jax.exact import exact_attention
from hyperattention_jax.sharding import activation_spec, sharded_hyper_attention

__all__ = [
    "PAPER_CONFIG",
    "PRESETS",
    "PRETRAINED_LM_CONFIG",
    "HyperAttentionConfig",
    "activation_spec",
    "available_implementations",
    "exact_attention",
    "hyper_attention",
    "sharded_hyper_attention",
]

__version__ = "0.1.0"
