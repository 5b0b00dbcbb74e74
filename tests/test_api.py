"""Tests of the public API: exactness, statistics, gradients, invariances and validation."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

import hyperattention_jax as ha
from hyperattention_jax import lsh
from hyperattention_jax import sampling
from hyperattention_jax.lsh_attention import blocking

# Small sizes that still take the approximate path (q_len > min_seq_len, several blocks).
SMALL = ha.HyperAttentionConfig(block_size=16, sample_size=8, num_projections=4, min_seq_len=40,
                                sink_size=0, window_size=0)


def fresh_key():
  return jax.random.key(np.random.default_rng().integers(1 << 30))


def random_qkv(key, *, batch=2, q_len=100, kv_len=None, heads=4, kv_heads=2, dim=16, v_dim=None,
               dtype=jnp.float32):
  kq, kk, kv = jax.random.split(key, 3)
  kv_len = q_len if kv_len is None else kv_len
  return (jax.random.normal(kq, (batch, q_len, heads, dim), dtype),
          jax.random.normal(kk, (batch, kv_len, kv_heads, dim), dtype),
          jax.random.normal(kv, (batch, kv_len, kv_heads, v_dim or dim), dtype))


def clustered_qkv(key, *, length=256, clusters=64, dim=16, spread=0.1, sharpness=6.0):
  """Each token's query and key lie near its cluster's centre: attention stays in the cluster."""
  kc, kq, kk, kv, ka = jax.random.split(key, 5)
  centres = jax.random.normal(kc, (clusters, dim))
  centres = sharpness * centres / jnp.linalg.norm(centres, axis=-1, keepdims=True)
  q = k = centres[jax.random.randint(ka, (1, length, 1), 0, clusters)]
  q = q + spread * jax.random.normal(kq, q.shape)
  k = k + spread * jax.random.normal(kk, k.shape)
  return q, k, jax.random.normal(kv, (1, length, 1, dim))


def rel_error(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.linalg.norm(x - y) / np.linalg.norm(y)


attend = jax.jit(ha.hyper_attention, static_argnames=("is_causal", "config", "implementation",
                                                      "return_lse"))
exact = jax.jit(ha.exact_attention, static_argnames=("is_causal", "return_lse"))


class ExactnessTest(parameterized.TestCase):
  """Cases where HyperAttention must equal exact attention up to rounding."""

  @parameterized.product(
      (dict(case="short", dtype=jnp.float32), dict(case="one_block", dtype=jnp.float32),
       dict(case="local_covers_all", dtype=jnp.float32),
       dict(case="local_covers_all", dtype=jnp.bfloat16)),
      causal=(False, True),
  )
  def test_degenerate_cases_are_exact(self, causal, dtype, case):
    q, k, v = random_qkv(fresh_key(), q_len=77, dtype=dtype)
    lengths = jnp.array([77, 50])
    config = {
        "short": ha.HyperAttentionConfig(block_size=16, sample_size=8, min_seq_len=77),
        "one_block": ha.HyperAttentionConfig(block_size=77, sample_size=8, min_seq_len=20),
        # Every key within the window: the LSH part has nothing left to approximate.
        "local_covers_all": SMALL.replace(sink_size=3, window_size=77),
    }[case]
    got, got_lse = attend(q, k, v, is_causal=causal, config=config, return_lse=True,
                          key_value_seq_lengths=lengths)
    want, want_lse = exact(q, k, v, is_causal=causal, return_lse=True,
                           key_value_seq_lengths=lengths)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    chex.assert_trees_all_close(got.astype(jnp.float32), want.astype(jnp.float32), rtol=tol,
                                atol=tol)
    chex.assert_trees_all_close(got_lse, want_lse, rtol=1e-5 if dtype == jnp.float32 else 1e-2,
                                atol=1e-5 if dtype == jnp.float32 else 1e-2)

  def test_named_configurations(self):
    self.assertEqual((ha.PAPER_CONFIG.sink_size, ha.PAPER_CONFIG.window_size), (0, 0))
    self.assertEqual(ha.PAPER_CONFIG.replace(sink_size=4), ha.HyperAttentionConfig())
    self.assertEqual(ha.PRETRAINED_LM_CONFIG, ha.HyperAttentionConfig(
        block_size=512, sample_size=0, min_seq_len=8192, sink_size=4, window_size=2048))
    self.assertEqual(ha.PRESETS, {"default": ha.HyperAttentionConfig(),
                                  "paper": ha.PAPER_CONFIG,
                                  "pretrained_lm": ha.PRETRAINED_LM_CONFIG})
    # Exact below its min_seq_len, like any configuration.
    q, k, v = random_qkv(fresh_key(), q_len=50)
    chex.assert_trees_all_close(attend(q, k, v, is_causal=True, config=ha.PRETRAINED_LM_CONFIG),
                                exact(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)

  def test_cross_attention_with_sinks_only_covering_all_keys_is_exact(self):
    q, k, v = random_qkv(fresh_key(), q_len=70, kv_len=45, v_dim=8)
    config = SMALL.replace(sink_size=45)
    got = attend(q, k, v, config=config)
    chex.assert_trees_all_close(got, exact(q, k, v), rtol=1e-5, atol=1e-5)


class StatisticsTest(parameterized.TestCase):

  # (True, (2, 0)): causal sinks without a window.
  @parameterized.parameters((False, (0, 0)), (False, (2, 5)), (True, (2, 5)), (True, (2, 0)))
  def test_row_sums_are_unbiased(self, causal, local):
    # E[exp(lse)] is the exact row sum: average the ratio over many independent draws.
    q, k, v = random_qkv(jax.random.key(3), batch=1, q_len=96, heads=2, kv_heads=1, dim=8)
    config = SMALL.replace(sink_size=local[0], window_size=local[1])
    _, want_lse = exact(q, k, v, is_causal=causal, return_lse=True)
    draw = jax.jit(jax.vmap(lambda r: ha.hyper_attention(
        q, k, v, rng=r, is_causal=causal, config=config, projections=jax.random.normal(jax.random.key(4), (8, 4)),
        return_lse=True)[1]))
    # Fixed draws: with fresh ones, a run now and then put some row past 5 standard
    # errors (the ratio has a heavy right tail), so the test failed at random.
    ratios = np.asarray(jnp.exp(draw(jax.random.split(jax.random.key(5), 512)) - want_lse))
    mean = ratios.mean(axis=0)
    stderr = ratios.std(axis=0) / np.sqrt(ratios.shape[0])
    # Each row's mean lies within 5 standard errors of 1, and so does the mean over rows.
    self.assertLess(np.max(np.abs(mean - 1) / np.maximum(stderr, 1e-6)), 5.0)
    per_draw = ratios.mean(axis=(1, 2, 3))
    self.assertLess(abs(per_draw.mean() - 1), 5 * per_draw.std() / np.sqrt(len(per_draw)))

  def test_lsh_beats_sampling_alone_on_clustered_inputs(self):
    q, k, v = clustered_qkv(jax.random.key(0))
    want = exact(q, k, v)
    keys = jax.random.split(jax.random.key(1), 8)
    config = SMALL.replace(block_size=32, num_projections=7)

    def mean_error(sample_size):
      draw = jax.jit(jax.vmap(lambda r: ha.hyper_attention(
          q, k, v, rng=r, config=config.replace(sample_size=sample_size))))
      return np.mean([rel_error(out, want) for out in draw(keys)])

    def sampling_only_error(num_keys):  # uniform columns only, the same keys per query
      errors = []
      for key in keys:
        idx = jax.random.randint(key, (num_keys,), 0, q.shape[1])
        errors.append(rel_error(exact(q, k[:, idx], v[:, idx]), want))
      return np.mean(errors)

    hyper = [mean_error(m) for m in (8, 32, 128)]
    self.assertLess(hyper[1], 0.5 * sampling_only_error(32 + 32))  # equal cost per query
    self.assertLess(hyper[2], hyper[1])
    self.assertLess(hyper[1], hyper[0])


def dense_hyper_attention(q, k, v, projections, rng, config, lengths):
  """Non-causal HyperAttention written as one dense weighted softmax over all keys.

  Each key's weight for query row i: 1 if it is in i's exact set or in i's LSH block,
  otherwise (n_valid / m) times the number of times it was sampled.
  """
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, n, d]
  batch, heads, n, _ = q.shape
  groups = heads // k.shape[1]
  k, v = (jnp.repeat(x, groups, axis=1) for x in (k, v))
  pos = jnp.arange(n)
  valid = pos[None, :] < lengths[:, None]  # [B, n]
  q_key = lsh.sort_key(q, projections, ~valid[:, None, :])
  k_key = lsh.sort_key(k, projections, ~valid[:, None, :])
  q_rank = lsh.invert_permutation(lsh.sort_permutation(q_key))
  k_perm = lsh.sort_permutation(k_key)
  k_rank = lsh.invert_permutation(k_perm)
  _, _, block = blocking(n, n, config.block_size)
  same_block = (q_rank[..., :, None] // block) == (k_rank[..., None, :] // block)
  u = sampling.sample_uniforms(jax.random.fold_in(rng, 1), heads // groups, config.sample_size)
  u = jnp.repeat(u, groups, axis=0)[None]
  sampled_rank = sampling.sample_indices(u, lengths[:, None, None])  # [B, H, m] sorted ranks
  sampled_key = jnp.take_along_axis(k_perm, sampled_rank, axis=-1)
  counts = jnp.sum(sampled_key[..., None] == pos, axis=-2)  # [B, H, n]
  local = (pos[None, :] < config.sink_size) | (
      jnp.abs(pos[:, None] - pos[None, :]) < config.window_size)
  weight = jnp.where(local | same_block, 1.0,
                     counts[..., None, :] * lengths[:, None, None, None] / max(config.sample_size, 1))
  weight = jnp.where(valid[:, None, None, :], weight, 0.0)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = logits + jnp.log(weight)
  return jnp.swapaxes(jax.nn.softmax(logits, axis=-1) @ v, 1, 2)


class GradientTest(parameterized.TestCase):

  # The paper's algorithm; with sinks alone (the default's exact part); with sinks and a
  # window; and those without the sampled residual.
  @parameterized.parameters((0, 0, 8), (3, 0, 8), (2, 4, 8), (2, 4, 0))
  def test_gradient_matches_dense_formulation(self, sink, window, samples):
    q, k, v = random_qkv(fresh_key(), q_len=64, dim=8)
    lengths = jnp.array([64, 45])
    projections = jax.random.normal(fresh_key(), (8, 4))
    config = SMALL.replace(sink_size=sink, window_size=window, sample_size=samples)
    rng = fresh_key()
    cotangent = jax.random.normal(fresh_key(), q.shape)

    def loss(fn, q, k, v):
      return jnp.sum(fn(q, k, v) * cotangent)

    hyper = functools.partial(ha.hyper_attention, rng=rng, config=config, projections=projections,
                              key_value_seq_lengths=lengths)
    dense = functools.partial(dense_hyper_attention, projections=projections, rng=rng,
                              config=config, lengths=lengths)
    chex.assert_trees_all_close(jax.jit(hyper)(q, k, v), jax.jit(dense)(q, k, v), rtol=1e-4,
                                atol=1e-5)
    grads = jax.jit(jax.grad(functools.partial(loss, hyper), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(functools.partial(loss, dense), argnums=(0, 1, 2)))(q, k, v)
    chex.assert_trees_all_close(grads, want, rtol=1e-4, atol=1e-4)

  def test_check_grads(self):
    # Causal: every piece (leaves, LSH blocks, samples, sinks and window) is on the path; the
    # non-causal gradient is checked against the dense formulation above.
    causal = True
    q, k, v = random_qkv(jax.random.key(5), batch=1, q_len=50, heads=2, kv_heads=1, dim=8)
    config = SMALL.replace(sink_size=1, window_size=3)
    fn = functools.partial(ha.hyper_attention, is_causal=causal, config=config,
                           projections=jax.random.normal(jax.random.key(6), (8, 4)))
    jax.test_util.check_grads(jax.jit(fn), (q, k, v), order=1, modes=("rev",), atol=2e-2,
                              rtol=2e-2, eps=1e-3)

  def test_gradient_of_lse_flows(self):
    q, k, v = random_qkv(fresh_key(), q_len=60)
    fn = lambda q: jnp.sum(ha.hyper_attention(q, k, v, config=SMALL, is_causal=True,
                                              return_lse=True)[1])
    grad = jax.jit(jax.grad(fn))(q)
    chex.assert_tree_all_finite(grad)
    self.assertGreater(float(jnp.abs(grad).max()), 0.0)


class InvarianceTest(parameterized.TestCase):

  def test_same_rng_same_result_and_rng_matters(self):
    q, k, v = random_qkv(fresh_key())
    a = attend(q, k, v, rng=jax.random.key(1), config=SMALL)
    b = attend(q, k, v, rng=jax.random.key(1), config=SMALL)
    c = attend(q, k, v, rng=jax.random.key(2), config=SMALL)
    np.testing.assert_array_equal(a, b)
    self.assertGreater(float(jnp.abs(a - c).max()), 0.0)
    np.testing.assert_array_equal(attend(q, k, v, config=SMALL), attend(q, k, v, config=SMALL))

  def test_batch_invariance(self):
    # Causal: the recursion's rectangles are batched with the rows, the strictest case.
    causal = True
    q, k, v = random_qkv(fresh_key(), batch=3)
    lengths = jnp.array([100, 61, 90])
    run = lambda q, k, v, n: attend(q, k, v, config=SMALL.replace(sink_size=2), is_causal=causal,
                                    key_value_seq_lengths=n)
    batched = run(q, k, v, lengths)
    for row in range(3):
      alone = run(q[row:row + 1], k[row:row + 1], v[row:row + 1], lengths[row:row + 1])
      chex.assert_trees_all_close(alone[0], batched[row], rtol=1e-6, atol=1e-6)
    order = jnp.array([2, 0, 1])
    chex.assert_trees_all_close(run(q[order], k[order], v[order], lengths[order]),
                                batched[order], rtol=1e-6, atol=1e-6)
    vmapped = jax.vmap(lambda q, k, v, n: run(q[None], k[None], v[None], n[None])[0])
    chex.assert_trees_all_close(vmapped(q, k, v, lengths), batched, rtol=1e-6, atol=1e-6)

  def test_padding_does_not_change_valid_rows(self):
    # Padded keys and query rows sort last, so the valid rows see the unpadded problem.
    q, k, v = random_qkv(fresh_key(), batch=1, q_len=120)
    config = SMALL.replace(sink_size=2, window_size=3)
    padded = attend(q, k, v, config=config, key_value_seq_lengths=jnp.array([83]))
    alone = attend(q[:, :83], k[:, :83], v[:, :83], config=config)
    chex.assert_trees_all_close(padded[:, :83], alone, rtol=1e-5, atol=1e-6)
    # The values of padding keys never matter.
    noisy = attend(q, k, v.at[:, 83:].set(1e6), config=config,
                   key_value_seq_lengths=jnp.array([83]))
    chex.assert_trees_all_close(noisy[:, :83], padded[:, :83], rtol=1e-6, atol=1e-6)

  def test_fully_padded_rows_and_large_logits_are_finite(self):
    q, k, v = random_qkv(fresh_key(), q_len=90, dtype=jnp.bfloat16)
    for causal in (False, True):
      out = attend(q * 30, k * 30, v, config=SMALL.replace(sink_size=2), is_causal=causal,
                   key_value_seq_lengths=jnp.array([0, 90]))
      chex.assert_tree_all_finite(out)
      np.testing.assert_array_equal(out[0], 0)

  def test_no_recompilation_when_only_values_change(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(q, k, v, rng):
      return ha.hyper_attention(q, k, v, rng=rng, config=SMALL, is_causal=True)

    q, k, v = random_qkv(jax.random.key(0))
    for seed in range(3):
      q2, k2, v2 = random_qkv(jax.random.key(seed + 1))
      fn(q2, k2, v2, jax.random.key(seed)).block_until_ready()

  def test_remat_and_value_head_dim(self):
    q, k, v = random_qkv(fresh_key(), v_dim=24)
    fn = jax.checkpoint(lambda q: ha.hyper_attention(q, k, v, config=SMALL))
    out = jax.jit(fn)(q)
    self.assertEqual(out.shape, (2, 100, 4, 24))
    chex.assert_tree_all_finite(jax.jit(jax.grad(lambda q: jnp.sum(fn(q))))(q))


class ValidationTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.q, self.k, self.v = random_qkv(jax.random.key(0), q_len=20)

  @parameterized.named_parameters(
      ("rank", dict(query=jnp.ones((20, 4, 16))), "query must have rank 4"),
      ("int_dtype", dict(query=jnp.ones((2, 20, 4, 16), jnp.int32)), "floating dtype"),
      ("mixed_dtype", dict(value=jnp.ones((2, 20, 2, 16), jnp.bfloat16)), "share one dtype"),
      ("batch", dict(key=jnp.ones((3, 20, 2, 16)), value=jnp.ones((3, 20, 2, 16))), "batch"),
      ("kv_seq", dict(value=jnp.ones((2, 19, 2, 16))), "share seq and heads"),
      ("head_dim", dict(key=jnp.ones((2, 20, 2, 8))), "head_dim differ"),
      ("heads", dict(key=jnp.ones((2, 20, 3, 16)), value=jnp.ones((2, 20, 3, 16))),
       "num_heads=4, num_kv_heads=3"),
      ("causal_cross", dict(key=jnp.ones((2, 21, 2, 16)), value=jnp.ones((2, 21, 2, 16)),
                            is_causal=True), "q_len=20, kv_len=21"),
      ("window_cross", dict(key=jnp.ones((2, 21, 2, 16)), value=jnp.ones((2, 21, 2, 16)),
                            config=ha.HyperAttentionConfig(window_size=4)), "window_size=4"),
      ("projections", dict(projections=jnp.ones((16, 3))), "projections must have shape"),
      ("lengths_shape", dict(key_value_seq_lengths=jnp.ones((3,), jnp.int32)),
       "key_value_seq_lengths must have shape"),
      ("lengths_dtype", dict(key_value_seq_lengths=jnp.ones((2,))), "must be integers"),
      ("lengths_range", dict(key_value_seq_lengths=jnp.array([5, 21])), "[5, 21]"),
      ("implementation", dict(implementation="triton"), "implementation='triton'"),
      ("unavailable", dict(implementation="mosaic_tpu"), "implementation='mosaic_tpu'"),
      ("scale", dict(scale=-1.0), "scale=-1.0"),
      ("rng", dict(rng=3), "rng must be a PRNG key"),
      ("config", dict(config={"block_size": 4}), "config must be a HyperAttentionConfig"),
      ("empty", dict(query=jnp.ones((2, 0, 4, 16))), "empty axis"),
  )
  def test_bad_arguments(self, overrides, message):
    args = dict(query=self.q, key=self.k, value=self.v)
    args.update(overrides)
    with self.assertRaisesRegex(ValueError, message.replace("[", r"\[").replace("(", r"\(")):
      ha.hyper_attention(**args)

  @parameterized.named_parameters(
      ("block", dict(block_size=0), "block_size=0"),
      ("samples", dict(sample_size=-1), "sample_size=-1"),
      ("projections", dict(num_projections=31), "num_projections=31"),
      ("float", dict(min_seq_len=4.0), "min_seq_len=4.0"),
      ("bool", dict(window_size=True), "window_size=True"),
  )
  def test_bad_config(self, fields, message):
    with self.assertRaisesRegex(ValueError, message):
      ha.HyperAttentionConfig(**fields)

  def test_config_is_hashable_and_frozen(self):
    self.assertEqual(hash(ha.HyperAttentionConfig()), hash(ha.HyperAttentionConfig()))
    with self.assertRaises(Exception):
      ha.HyperAttentionConfig().block_size = 3

  def test_raw_uint32_key_accepted(self):
    out = ha.hyper_attention(self.q, self.k, self.v, rng=jax.random.PRNGKey(0))
    self.assertEqual(out.shape, self.q.shape)


if __name__ == "__main__":
  absltest.main()
