"""Tests of the Flax layers (nnx, linen) and the attention_fn adapters."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import flax
from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import hyperattention_jax as ha
from hyperattention_jax.flax import exact_attention_fn, hyper_attention_fn
from hyperattention_jax.flax import linen as ha_linen
from hyperattention_jax.flax import nnx as ha_nnx

# Small sizes that take the approximate path (length > min_seq_len, several blocks) with a
# single level of causal recursion, to keep compilation short.
SMALL = ha.HyperAttentionConfig(block_size=16, sample_size=8, num_projections=4,
                                min_seq_len=64, sink_size=0)
LONG = 128
SHORT = 24
FEATURES = 32
HEADS = 4


def fresh_key():
  return jax.random.key(np.random.default_rng().integers(1 << 30))


def inputs(key, length, batch=2):
  return jax.random.normal(key, (batch, length, FEATURES))


def right_padding(length, valid_lengths):
  return jnp.arange(length)[None, :] < jnp.asarray(valid_lengths)[:, None]


def masks(length):
  """Masks of the supported forms, with the valid query rows of each."""
  valid = right_padding(length, [length - 5, length])
  causal = nn.make_causal_mask(jnp.ones((2, length)))
  padding = nn.make_attention_mask(valid, valid)
  everything = jnp.ones((2, length), bool)
  return {
      "none": (None, everything),
      "causal": (causal, everything),
      "padding": (padding, valid),
      "causal_padding": (nn.combine_masks(causal, padding), valid),
      "keys_only": (nn.make_attention_mask(everything, valid), everything),
  }


def assert_close_on_valid_rows(out, expected, valid):
  """Compares ``[batch, length, features]`` outputs on the query rows that see some key.

  Flax gives a fully masked row the mean of all values; HyperAttention gives zeros.
  """
  chex.assert_trees_all_close(jnp.where(valid[..., None], out, 0),
                              jnp.where(valid[..., None], expected, 0), atol=1e-5, rtol=1e-5)


def nnx_params_as_linen(layer):
  """The variables of a linen ``HyperAttention`` equal to the nnx ``layer``."""
  params = {name: {"kernel": getattr(layer, name).kernel[...],
                   "bias": getattr(layer, name).bias[...]}
            for name in ("query", "key", "value", "out")}
  return {"params": params, ha_linen.LSH_COLLECTION: {"projections": layer.projections[...]}}


def functional_layer(layer, x, *, rng, is_causal, config):
  """What an nnx ``HyperAttention`` layer computes, from ``hyper_attention``."""
  out = ha.hyper_attention(layer.query(x), layer.key(x), layer.value(x), rng=rng,
                           is_causal=is_causal, config=config,
                           projections=layer.projections[...])
  return layer.out(out)


class ModuleTest(parameterized.TestCase):

  @parameterized.parameters((False, HEADS), (True, 2))
  def test_nnx_matches_functional_call(self, is_causal, num_kv_heads):
    layer = ha_nnx.HyperAttention(HEADS, FEATURES, num_kv_heads=num_kv_heads,
                                  is_causal=is_causal, config=SMALL, rngs=nnx.Rngs(0))
    x, rng = inputs(fresh_key(), LONG), fresh_key()
    chex.assert_trees_all_close(layer(x, rngs=rng),
                                functional_layer(layer, x, rng=rng, is_causal=is_causal,
                                                 config=SMALL), atol=1e-6, rtol=1e-6)

  @parameterized.parameters(False, True)
  def test_linen_matches_nnx(self, is_causal):
    layer = ha_nnx.HyperAttention(HEADS, FEATURES, num_kv_heads=2, is_causal=is_causal,
                                  config=SMALL, rngs=nnx.Rngs(1))
    linen_layer = ha_linen.HyperAttention(num_heads=HEADS, num_kv_heads=2, is_causal=is_causal,
                                          config=SMALL)
    x, rng = inputs(fresh_key(), LONG), fresh_key()
    variables = nnx_params_as_linen(layer)
    chex.assert_trees_all_equal_shapes(linen_layer.init(jax.random.key(0), x), variables)
    from_stream = linen_layer.apply(variables, x, rngs={"hyper_attention": rng})
    chex.assert_trees_all_close(linen_layer.apply(variables, x, rng=rng), layer(x, rngs=rng),
                                atol=1e-5, rtol=1e-5)
    # The stream's key is derived from rng, not rng itself; the result is still reproducible.
    chex.assert_trees_all_equal(from_stream,
                                linen_layer.apply(variables, x, rngs={"hyper_attention": rng}))

  def test_same_seed_gives_flax_parameters(self):
    layer = ha_nnx.HyperAttention(HEADS, FEATURES, rngs=nnx.Rngs(3))
    flax_layer = nnx.MultiHeadAttention(HEADS, FEATURES, decode=False, rngs=nnx.Rngs(3))
    chex.assert_trees_all_equal(nnx.state(layer, nnx.Param), nnx.state(flax_layer, nnx.Param))
    x = inputs(jax.random.key(0), SHORT)
    variables = ha_linen.HyperAttention(num_heads=HEADS).init(jax.random.key(3), x)
    flax_variables = nn.MultiHeadDotProductAttention(num_heads=HEADS).init(jax.random.key(3), x)
    chex.assert_trees_all_equal(variables["params"], flax_variables["params"])

  @parameterized.parameters(("none", False), ("causal", False), ("padding", False),
                            ("causal_padding", False), ("keys_only", False), ("none", True),
                            ("padding", True))
  def test_short_sequences_match_flax_nnx(self, mask_name, is_causal):
    mask, valid = masks(SHORT)[mask_name]
    flax_layer = nnx.MultiHeadAttention(HEADS, FEATURES, num_kv_heads=2, decode=False,
                                        rngs=nnx.Rngs(0))
    layer = ha_nnx.HyperAttention(HEADS, FEATURES, num_kv_heads=2, is_causal=is_causal,
                                  rngs=nnx.Rngs(0))
    nnx.update(layer, nnx.state(flax_layer, nnx.Param))
    x = inputs(fresh_key(), SHORT)
    expected = flax_layer(x, mask=mask, is_causal=is_causal)
    assert_close_on_valid_rows(layer(x, mask=mask), expected, valid)

  @parameterized.parameters("none", "causal", "padding", "causal_padding", "keys_only")
  def test_short_sequences_match_flax_linen(self, mask_name):
    mask, valid = masks(SHORT)[mask_name]
    x = inputs(fresh_key(), SHORT)
    flax_layer = nn.MultiHeadDotProductAttention(num_heads=HEADS)
    layer = ha_linen.HyperAttention(num_heads=HEADS)
    variables = layer.init(jax.random.key(0), x)
    expected = flax_layer.apply({"params": variables["params"]}, x, mask=mask)
    assert_close_on_valid_rows(layer.apply(variables, x, mask=mask), expected, valid)

  def test_padding_queries_give_zero(self):
    mask, valid = masks(SHORT)["padding"]
    layer = ha_nnx.HyperAttention(HEADS, FEATURES, use_bias=False, rngs=nnx.Rngs(0))
    out = layer(inputs(fresh_key(), SHORT), mask=mask)
    chex.assert_trees_all_equal(out[~valid], jnp.zeros_like(out[~valid]))

  def test_deterministic_without_stream(self):
    x = inputs(fresh_key(), LONG)
    layer = ha_nnx.HyperAttention(HEADS, FEATURES, config=SMALL, rngs=nnx.Rngs(0))
    chex.assert_trees_all_equal(layer(x), layer(x))
    linen_layer = ha_linen.HyperAttention(num_heads=HEADS, config=SMALL)
    variables = linen_layer.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(linen_layer.apply(variables, x), linen_layer.apply(variables, x))

  def test_stream_draws_fresh_samples_and_keeps_hyperplanes(self):
    x = inputs(fresh_key(), LONG)
    layer = ha_nnx.HyperAttention(HEADS, FEATURES, config=SMALL,
                                  rngs=nnx.Rngs(params=0, hyper_attention=1))
    planes = layer.projections[...]
    first, second = layer(x), layer(x)
    self.assertGreater(float(jnp.max(jnp.abs(first - second))), 1e-4)
    chex.assert_trees_all_equal(layer.projections[...], planes)
    linen_layer = ha_linen.HyperAttention(num_heads=HEADS, config=SMALL)
    variables = linen_layer.init(jax.random.key(0), x)
    one, two = (linen_layer.apply(variables, x, rngs={"hyper_attention": jax.random.key(s)})
                for s in (1, 2))
    self.assertGreater(float(jnp.max(jnp.abs(one - two))), 1e-4)

  def test_rejects_bad_configuration(self):
    with self.assertRaisesRegex(ValueError, "num_kv_heads"):
      ha_nnx.HyperAttention(HEADS, FEATURES, num_kv_heads=3, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "qkv_features"):
      ha_nnx.HyperAttention(3, FEATURES, rngs=nnx.Rngs(0))
    layer = ha_nnx.HyperAttention(HEADS, FEATURES, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "in_features"):
      layer(jnp.ones((1, 4, 8)))
    with self.assertRaisesRegex(ValueError, "sow"):
      layer(jnp.ones((1, 4, FEATURES)), sow_weights=True)
    with self.assertRaisesRegex(ValueError, "decode"):
      layer(jnp.ones((1, 4, FEATURES)), decode=True)
    x = jnp.ones((1, 4, FEATURES))
    chex.assert_trees_all_equal(layer(x, deterministic=False), layer(x))


class TrainingTest(parameterized.TestCase):

  def test_nnx_jit_grad_updates_params_only(self):
    layer = ha_nnx.HyperAttention(HEADS, FEATURES, is_causal=True, config=SMALL,
                                  rngs=nnx.Rngs(params=0, hyper_attention=1))
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
    x, target = inputs(fresh_key(), LONG), inputs(fresh_key(), LONG)

    @nnx.jit
    def step(layer, optimizer, x, target):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(layer)
      optimizer.update(layer, grads)
      return loss, grads

    planes = layer.projections[...]
    weights = layer.query.kernel[...]
    losses = []
    for _ in range(3):
      loss, grads = step(layer, optimizer, x, target)
      losses.append(float(loss))
      chex.assert_tree_all_finite(nnx.state(grads))
    self.assertLess(losses[-1], losses[0])
    self.assertNotIn("projections", nnx.state(grads))
    chex.assert_trees_all_equal(layer.projections[...], planes)
    self.assertFalse(np.array_equal(layer.query.kernel[...], weights))

  def test_linen_jit_grad(self):
    layer = ha_linen.HyperAttention(num_heads=HEADS, is_causal=True, config=SMALL)
    x, target = inputs(fresh_key(), LONG), inputs(fresh_key(), LONG)
    variables = layer.init(jax.random.key(0), x)
    tx = optax.adam(1e-2)

    @chex.assert_max_traces(n=1)
    def loss_fn(params, lsh, rng):
      out = layer.apply({"params": params, "lsh": lsh}, x, rngs={"hyper_attention": rng})
      return jnp.mean((out - target) ** 2)

    @jax.jit
    def step(params, opt_state, lsh, rng):
      loss, grads = jax.value_and_grad(loss_fn)(params, lsh, rng)
      updates, opt_state = tx.update(grads, opt_state)
      return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = variables["params"], tx.init(variables["params"])
    losses = []
    for i in range(3):
      params, opt_state, loss = step(params, opt_state, variables["lsh"], jax.random.key(i))
      losses.append(float(loss))
    chex.assert_tree_all_finite(params)
    self.assertLess(losses[-1], losses[0])


class CheckpointTest(parameterized.TestCase):

  def test_nnx_round_trip(self):
    x, rng = inputs(fresh_key(), LONG), fresh_key()
    layer = ha_nnx.HyperAttention(HEADS, FEATURES, config=SMALL, rngs=nnx.Rngs(0))
    saved = flax.serialization.to_bytes(nnx.to_pure_dict(nnx.state(layer)))
    restored = ha_nnx.HyperAttention(HEADS, FEATURES, config=SMALL, rngs=nnx.Rngs(7))
    self.assertFalse(np.array_equal(restored.projections[...], layer.projections[...]))
    state = nnx.state(restored)
    nnx.replace_by_pure_dict(
        state, flax.serialization.from_bytes(nnx.to_pure_dict(state), saved))
    nnx.update(restored, state)
    chex.assert_trees_all_equal(restored(x, rngs=rng), layer(x, rngs=rng))

  def test_linen_round_trip(self):
    x, rng = inputs(fresh_key(), LONG), fresh_key()
    layer = ha_linen.HyperAttention(num_heads=HEADS, config=SMALL)
    variables = layer.init(jax.random.key(0), x)
    saved = flax.serialization.to_bytes(variables)
    restored = flax.serialization.from_bytes(layer.init(jax.random.key(7), x), saved)
    chex.assert_trees_all_equal(layer.apply(restored, x, rng=rng),
                                layer.apply(variables, x, rng=rng))


class AdapterTest(parameterized.TestCase):

  @parameterized.parameters(
      *[(name, hyper_attention_fn, jit) for name in ("none", "causal", "padding",
                                                     "causal_padding", "keys_only")
        for jit in (False, True)],
      ("causal_padding", exact_attention_fn, False), ("causal_padding", exact_attention_fn, True))
  def test_nnx_multi_head_attention(self, mask_name, fn, jit):
    mask, valid = masks(SHORT)[mask_name]
    flax_layer = nnx.MultiHeadAttention(HEADS, FEATURES, num_kv_heads=2, decode=False,
                                        rngs=nnx.Rngs(0))
    swapped = nnx.MultiHeadAttention(HEADS, FEATURES, num_kv_heads=2, decode=False,
                                     attention_fn=fn, rngs=nnx.Rngs(0))
    # Under jit the mask is traced: its causal part must be declared.
    is_causal = jit and "causal" in mask_name
    call = nnx.jit(lambda m, x, mask: m(x, mask=mask, is_causal=is_causal)) if jit else (
        lambda m, x, mask: m(x, mask=mask))
    x = inputs(fresh_key(), SHORT)
    assert_close_on_valid_rows(call(swapped, x, mask), flax_layer(x, mask=mask), valid)

  @parameterized.parameters("none", "causal", "padding", "causal_padding")
  def test_linen_multi_head_dot_product_attention(self, mask_name):
    mask, valid = masks(SHORT)[mask_name]
    x = inputs(fresh_key(), SHORT)
    flax_layer = nn.MultiHeadDotProductAttention(num_heads=HEADS)
    variables = flax_layer.init(jax.random.key(0), x)
    expected = flax_layer.apply(variables, x, mask=mask)
    # linen's layer has no is_causal argument: bind it, and jit with a traced mask.
    fn = functools.partial(hyper_attention_fn, is_causal="causal" in mask_name)
    swapped = nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=fn)
    out = jax.jit(lambda v, x, mask: swapped.apply(v, x, mask=mask))(variables, x, mask)
    assert_close_on_valid_rows(out, expected, valid)

  def test_matches_functional_call_on_long_inputs(self):
    q, k, v = (jax.random.normal(key, (2, LONG, HEADS, 8)) for key in jax.random.split(
        fresh_key(), 3))
    rng = fresh_key()
    lengths = jnp.array([LONG - 20, LONG])
    mask = nn.make_attention_mask(jnp.ones((2, LONG), bool), right_padding(LONG, lengths))
    chex.assert_trees_all_close(
        hyper_attention_fn(q, k, v, mask=mask, rng=rng, config=SMALL, dropout_rate=0.1,
                           deterministic=True, broadcast_dropout=False, dropout_rng=None),
        ha.hyper_attention(q, k, v, rng=rng, config=SMALL, key_value_seq_lengths=lengths),
        atol=1e-6, rtol=1e-6)

  def test_batch_dims(self):
    q, k, v = (jax.random.normal(key, (1, 2, SHORT, HEADS, 8))
               for key in jax.random.split(fresh_key(), 3))
    expected = nnx.dot_product_attention(q, k, v, is_causal=True)
    chex.assert_trees_all_close(hyper_attention_fn(q, k, v, is_causal=True), expected,
                                atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(hyper_attention_fn(q[0, 0], k[0, 0], v[0, 0], is_causal=True),
                                expected[0, 0], atol=1e-5, rtol=1e-5)

  def test_decode_cache_mask(self):
    flax_layer = nnx.MultiHeadAttention(HEADS, FEATURES, decode=True, rngs=nnx.Rngs(0))
    swapped = nnx.MultiHeadAttention(HEADS, FEATURES, decode=True, rngs=nnx.Rngs(0),
                                     attention_fn=hyper_attention_fn)
    x = inputs(fresh_key(), SHORT)
    for layer in (flax_layer, swapped):
      layer.init_cache(x.shape)
    for t in range(3):
      chex.assert_trees_all_close(swapped(x[:, t:t + 1]), flax_layer(x[:, t:t + 1]),
                                  atol=1e-5, rtol=1e-5)


class MaskErrorTest(parameterized.TestCase):

  def unsupported_masks(self):
    causal = nn.make_causal_mask(jnp.ones((2, SHORT)), dtype=bool)
    left = nn.make_attention_mask(jnp.ones((2, SHORT), bool),
                                  ~right_padding(SHORT, [3, 0]))
    per_head = jnp.concatenate([causal, jnp.ones_like(causal)], axis=1)
    window = causal & (jnp.arange(SHORT)[None, :] > jnp.arange(SHORT)[:, None] - 4)
    random = jax.random.bernoulli(jax.random.key(0), 0.5, (2, 1, SHORT, SHORT))
    return {"left_padding": left, "per_head": jnp.broadcast_to(per_head, (2, 2, SHORT, SHORT)),
            "window": window, "random": random}

  @parameterized.parameters("left_padding", "per_head", "window", "random")
  def test_concrete_mask_raises_value_error(self, name):
    q = jax.random.normal(fresh_key(), (2, SHORT, 2, 8))
    with self.assertRaisesRegex(ValueError, "HyperAttention represents only masks"):
      hyper_attention_fn(q, q, q, mask=self.unsupported_masks()[name])

  @parameterized.parameters("left_padding", "random")
  def test_traced_mask_raises_at_run_time(self, name):
    q = jax.random.normal(fresh_key(), (2, SHORT, 2, 8))
    call = jax.jit(lambda q, mask: hyper_attention_fn(q, q, q, mask=mask))
    with self.assertRaisesRegex(Exception, "HyperAttention represents only masks"):
      jax.block_until_ready(call(q, self.unsupported_masks()[name]))

  def test_traced_causal_mask_needs_flag(self):
    q = jax.random.normal(fresh_key(), (2, SHORT, 2, 8))
    causal = nn.make_causal_mask(jnp.ones((2, SHORT)))
    call = jax.jit(lambda q, mask: hyper_attention_fn(q, q, q, mask=mask))
    with self.assertRaisesRegex(Exception, "needs is_causal=True"):
      jax.block_until_ready(call(q, causal))
    unchecked = jax.jit(lambda q, mask: hyper_attention_fn(q, q, q, mask=mask, check_mask=False))
    jax.block_until_ready(unchecked(q, causal))  # no check, no error (and a wrong result)

  def test_unsupported_flax_options_raise(self):
    q = jax.random.normal(fresh_key(), (2, SHORT, 2, 8))
    with self.assertRaisesRegex(ValueError, "dropout"):
      hyper_attention_fn(q, q, q, dropout_rate=0.1, deterministic=False)
    with self.assertRaisesRegex(ValueError, "bias"):
      hyper_attention_fn(q, q, q, bias=jnp.zeros((2, 2, SHORT, SHORT)))
    with self.assertRaisesRegex(ValueError, "rotary"):
      hyper_attention_fn(q, q, q, input_positions=jnp.arange(SHORT))
    layer = nnx.MultiHeadAttention(HEADS, FEATURES, decode=False, rngs=nnx.Rngs(0),
                                   attention_fn=hyper_attention_fn)
    with self.assertRaisesRegex(ValueError, "sow"):
      layer(inputs(fresh_key(), SHORT), sow_weights=True)


if __name__ == "__main__":
  absltest.main()
