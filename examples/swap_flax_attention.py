"""Swapping HyperAttention into an existing Flax model.

``Encoder`` below stands for a model written with Flax's own attention layer
(``nnx.MultiHeadAttention``), with its weights already trained. HyperAttention goes in
without touching the model's code or weights, in one of three ways:

1. ``attention_fn``: build the model with
   ``attention_fn=functools.partial(hyper_attention_fn, config=...)``. The parameters
   are unchanged; the hyperplanes are drawn from a fixed key (or the ``rng`` you bind).
2. Layer replacement (nnx): put a ``hyperattention_jax.flax.nnx.HyperAttention`` in place
   of each ``nnx.MultiHeadAttention`` and copy the weights with ``nnx.update``; the
   hyperplanes become a variable of the layer, saved with the model's state.
3. linen: ``nn.MultiHeadDotProductAttention`` takes the same ``attention_fn``, and the
   linen ``HyperAttention`` takes its ``params`` as they are, plus an ``"lsh"`` collection.

Inputs no longer than ``min_seq_len`` get exact attention, so on short sequences every
variant reproduces Flax's output to rounding; on long ones they approximate it. The script
prints, for each variant, the relative difference from the original model's output (for
linen, of one residual block ``x + attention(x)``)::

  python3 examples/swap_flax_attention.py
  python3 examples/swap_flax_attention.py --long_len=8192 --min_seq_len=2048
"""

import functools

from absl import app
from absl import flags
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import hyperattention_jax as ha
from hyperattention_jax.flax import hyper_attention_fn
from hyperattention_jax.flax import linen as ha_linen
from hyperattention_jax.flax import nnx as ha_nnx

_SHORT_LEN = flags.DEFINE_integer("short_len", 256, "A length computed exactly.")
_LONG_LEN = flags.DEFINE_integer("long_len", 4096, "A length where HyperAttention approximates.")
_MODEL_DIM = flags.DEFINE_integer("model_dim", 128, "Model width.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Encoder blocks.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 128, "HyperAttention block size.")
_SAMPLE_SIZE = flags.DEFINE_integer("sample_size", 128, "HyperAttention sampled columns.")
_MIN_SEQ_LEN = flags.DEFINE_integer("min_seq_len", 1024, "Lengths up to this are exact.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights and inputs.")


class Encoder(nnx.Module):
  """A small pre-norm transformer encoder built on ``nnx.MultiHeadAttention``."""

  def __init__(self, dim: int, num_heads: int, num_layers: int, *,
               attention_fn=nnx.dot_product_attention, rngs: nnx.Rngs):
    def block():
      return nnx.Dict(
          norm=nnx.LayerNorm(dim, rngs=rngs),
          attention=nnx.MultiHeadAttention(num_heads, dim, decode=False,
                                           attention_fn=attention_fn, rngs=rngs),
          mlp=nnx.Linear(dim, dim, rngs=rngs))
    self.blocks = nnx.List([block() for _ in range(num_layers)])

  def __call__(self, x, mask=None):
    for block in self.blocks:
      x = x + block["attention"](block["norm"](x), mask=mask)
      x = x + jax.nn.gelu(block["mlp"](x))
    return x


def relative_difference(x, reference) -> float:
  x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
  return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  dim, heads, layers = _MODEL_DIM.value, _NUM_HEADS.value, _NUM_LAYERS.value
  config = ha.HyperAttentionConfig(block_size=_BLOCK_SIZE.value, sample_size=_SAMPLE_SIZE.value,
                                   min_seq_len=_MIN_SEQ_LEN.value)
  original = Encoder(dim, heads, layers, rngs=nnx.Rngs(_SEED.value))
  weights = nnx.state(original, nnx.Param)

  # 1. attention_fn: same model code, same weights.
  with_hook = Encoder(dim, heads, layers, rngs=nnx.Rngs(0),
                      attention_fn=functools.partial(hyper_attention_fn, config=config))
  nnx.update(with_hook, weights)

  # 2. Layer replacement: the hyperplanes become part of the model's state.
  replaced = Encoder(dim, heads, layers, rngs=nnx.Rngs(0))
  nnx.update(replaced, weights)
  for i, block in enumerate(replaced.blocks):
    layer = ha_nnx.HyperAttention(heads, dim, config=config, rngs=nnx.Rngs(params=i))
    nnx.update(layer, nnx.state(block["attention"], nnx.Param))
    block["attention"] = layer
  print(f"HyperAttention state of the replaced model: "
        f"{len(jax.tree.leaves(nnx.state(replaced, ha_nnx.LSHProjections)))} hyperplane arrays.")

  # 3. linen: one attention layer, its params used as they are.
  linen_flax = nn.MultiHeadDotProductAttention(num_heads=heads)
  linen_hook = nn.MultiHeadDotProductAttention(
      num_heads=heads, attention_fn=functools.partial(hyper_attention_fn, config=config))
  linen_layer = ha_linen.HyperAttention(num_heads=heads, config=config)
  sample = jnp.zeros((1, _SHORT_LEN.value, dim))
  linen_params = linen_flax.init(jax.random.key(_SEED.value), sample)["params"]
  lsh = linen_layer.init(jax.random.key(_SEED.value + 1), sample)[ha_linen.LSH_COLLECTION]
  # Compared inside a residual connection, as the layer sits in a model: with random
  # weights attention is spread thin, so the layer's own output is small.
  linen_variants = {
      "linen attention_fn": lambda x: x + linen_hook.apply({"params": linen_params}, x),
      "linen HyperAttention": lambda x: x + linen_layer.apply(
          {"params": linen_params, ha_linen.LSH_COLLECTION: lsh}, x),
  }

  forward = nnx.jit(lambda model, x: model(x))
  for length in (_SHORT_LEN.value, _LONG_LEN.value):
    x = jax.random.normal(jax.random.key(_SEED.value + length), (1, length, dim))
    reference = forward(original, x)
    print(f"length {length} ({'exact' if length <= config.min_seq_len else 'approximate'} "
          "path): relative difference from the original model")
    for name, model in (("nnx attention_fn", with_hook), ("nnx HyperAttention", replaced)):
      print(f"  {name:22s} {relative_difference(forward(model, x), reference):.2e}")
    linen_reference = jax.jit(lambda x: x + linen_flax.apply({"params": linen_params}, x))(x)
    for name, fn in linen_variants.items():
      print(f"  {name:22s} {relative_difference(jax.jit(fn)(x), linen_reference):.2e}")


if __name__ == "__main__":
  app.run(main)
