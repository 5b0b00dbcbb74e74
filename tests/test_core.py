"""Tests of the stages: LSH sort, the core primitive, the merge and exact attention."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from hyperattention_jax import core
from hyperattention_jax import lsh
from hyperattention_jax import merge
from hyperattention_jax.exact import exact_attention_bhnd, positions
from hyperattention_jax.local import sink_attention


def np_keep(p, t, rule, spec):
  """The key rule written out by hand, one (query, key) pair at a time."""
  if t < 0 or (spec.causal and t > p):
    return False
  local = t < spec.sink_size or abs(p - t) < spec.window_size
  return {core.ALL: True, core.LOCAL: local, core.NONLOCAL: not local}[rule]


def brute_force_block_attention(q, k, v, q_pos, k_pos, extra_k, extra_v, extra_pos, extra_block,
                                extra_bias, spec, scale):
  """The core primitive as a loop over query rows, in float64 numpy."""
  q, k, v, extra_k, extra_v = (np.asarray(x, np.float64) for x in (q, k, v, extra_k, extra_v))
  batch, q_heads, q_len, _ = q.shape
  groups = q_heads // k.shape[1]
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  lse = np.full(q.shape[:3], -np.inf)
  for b, h, i in itertools.product(range(batch), range(q_heads), range(q_len)):
    kh, blk, p = h // groups, i // spec.block_q, int(q_pos[b, h, i])
    logits, values = [], []
    for j in range(blk * spec.block_k, (blk + 1) * spec.block_k):
      if np_keep(p, int(k_pos[b, kh, j]), spec.diagonal_keys, spec):
        logits.append(scale * q[b, h, i] @ k[b, kh, j])
        values.append(v[b, kh, j])
    e = 0 if extra_pos.shape[2] == 1 else blk
    for t in range(extra_pos.shape[3]):
      if (int(extra_block[b, kh, e, t]) != blk
          and np_keep(p, int(extra_pos[b, kh, e, t]), spec.extra_keys, spec)):
        logits.append(scale * q[b, h, i] @ extra_k[b, kh, e, t] + float(extra_bias[b]))
        values.append(extra_v[b, kh, e, t])
    if logits:
      logits = np.array(logits)
      top = logits.max()
      weights = np.exp(logits - top)
      lse[b, h, i] = top + np.log(weights.sum())
      out[b, h, i] = weights @ np.array(values) / weights.sum()
  return out, lse


def random_primitive_inputs(seed, *, batch=2, q_heads=4, kv_heads=2, num_blocks=3, block_q=5,
                            block_k=7, dk=8, dv=6, num_extra=4, per_block=False, causal=False,
                            dtype=jnp.float32):
  """Random inputs of the core primitive: shuffled positions, padding, extras, bias."""
  rng = np.random.default_rng(seed)
  nq, nk = num_blocks * block_q, num_blocks * block_k
  q = rng.normal(size=(batch, q_heads, nq, dk))
  k = rng.normal(size=(batch, kv_heads, nk, dk))
  v = rng.normal(size=(batch, kv_heads, nk, dv))
  if causal:  # leaves: rows in original order
    q_pos = np.broadcast_to(np.arange(nq), (batch, q_heads, nq)).copy()
    k_pos = np.broadcast_to(np.arange(nk), (batch, kv_heads, nk)).copy()
  else:
    q_pos = np.stack([[rng.permutation(nq) for _ in range(q_heads)] for _ in range(batch)])
    k_pos = np.stack([[rng.permutation(nk) for _ in range(kv_heads)] for _ in range(batch)])
  k_pos = np.where(rng.random(k_pos.shape) < 0.15, -1, k_pos)  # padding keys
  sets = num_blocks if per_block else 1
  extra_k = rng.normal(size=(batch, kv_heads, sets, num_extra, dk))
  extra_v = rng.normal(size=(batch, kv_heads, sets, num_extra, dv))
  extra_pos = rng.integers(-1, nk, size=(batch, kv_heads, sets, num_extra))
  extra_block = (rng.integers(-1, num_blocks, size=extra_pos.shape) if not per_block
                 else np.full(extra_pos.shape, -1))
  extra_bias = rng.normal(size=(batch,))
  cast = lambda x: jnp.asarray(x, dtype)
  to_int = lambda x: jnp.asarray(x, jnp.int32)
  return (cast(q), cast(k), cast(v), to_int(q_pos), to_int(k_pos), cast(extra_k), cast(extra_v),
          to_int(extra_pos), to_int(extra_block), jnp.asarray(extra_bias, jnp.float32))


class LshTest(parameterized.TestCase):

  @parameterized.parameters(1, 3, 7)
  def test_bucket_rank_is_the_gray_order(self, r):
    # Rows that are +-1 on r axes hash to every code once with identity hyperplanes.
    codes = np.arange(1 << r)
    bits = (codes[:, None] >> np.arange(r)) & 1
    rank = np.asarray(lsh.bucket_rank(jnp.asarray(2.0 * bits - 1), jnp.eye(r)))
    np.testing.assert_array_equal(np.sort(rank), codes)  # a bijection
    code_at_rank = codes[np.argsort(rank)]
    flips = np.bitwise_xor(code_at_rank[1:], code_at_rank[:-1])
    # Neighbouring buckets differ in exactly one hyperplane.
    np.testing.assert_array_equal([bin(f).count("1") for f in flips], np.ones(len(flips)))

  def test_sort_is_stable_and_padding_goes_last(self):
    keys = jnp.array([[3, 1, 3, 0, 1, 3]], jnp.int32)
    padding = jnp.array([[False, True, False, False, False, False]])
    key = lsh.sort_key(jnp.zeros((1, 6, 2)), jnp.ones((2, 2)), padding)
    self.assertEqual(int(key[0, 1]), 4)
    perm = lsh.sort_permutation(keys)
    np.testing.assert_array_equal(perm, [[3, 1, 4, 0, 2, 5]])

  def test_invert_permutation(self):
    perm = jax.random.permutation(jax.random.key(0), 50)[None]
    inv = lsh.invert_permutation(perm)
    np.testing.assert_array_equal(lsh.gather(perm, inv)[0], np.arange(50))

  def test_head_sort_key_matches_sort_key_in_a_narrow_dtype(self):
    x = jax.random.normal(jax.random.key(1), (2, 37, 3, 8))
    projections = jax.random.normal(jax.random.key(2), (8, 7))
    padding = jax.random.bernoulli(jax.random.key(3), 0.2, (2, 3, 37))
    key = lsh.head_sort_key(x, projections, padding)
    self.assertEqual(key.dtype, jnp.uint8)
    want = lsh.sort_key(jnp.swapaxes(x, 1, 2), projections, padding)
    np.testing.assert_array_equal(key, want)
    np.testing.assert_array_equal(lsh.sort_permutation(key), lsh.sort_permutation(want))

  def test_row_map_and_permute_move_rows_both_ways(self):
    # Two groups of 5 rows (offsets 1 and 9) of a [B=2, n=12, H=3] source; rows 12, 13 of
    # the second group lie past the source and read as zeros.
    batch, n, heads, d, m = 2, 12, 3, 4, 5
    keys = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 4)
    perm = jax.vmap(lambda k: jax.random.permutation(k, m))(
        jax.random.split(keys[0], batch * 2 * heads)).reshape(batch, 2, heads, m)
    offsets = np.array([1, 9])
    rows = lsh.row_map(perm, offsets, n)
    x = jax.random.normal(keys[1], (batch, n, heads, d))
    src = np.asarray(offsets)[None, :, None, None] + np.asarray(perm)
    want = np.zeros((batch, 2, heads, m, d), np.float32)
    for b, g, h, i in itertools.product(range(batch), range(2), range(heads), range(m)):
      if src[b, g, h, i] < n:
        want[b, g, h, i] = x[b, src[b, g, h, i], h]
    flat_x = x.reshape(-1, d)
    got = lsh.permute(flat_x, rows.to_sorted, rows.from_sorted)
    np.testing.assert_array_equal(got.reshape(want.shape), want)
    # Back: each source row gets its sorted row, rows outside both groups get zeros.
    back = lsh.permute(got, rows.from_sorted, rows.to_sorted).reshape(x.shape)
    hit = np.zeros((batch, n, heads), bool)
    for b, g, h, i in itertools.product(range(batch), range(2), range(heads), range(m)):
      if src[b, g, h, i] < n:
        hit[b, src[b, g, h, i], h] = True
    np.testing.assert_array_equal(back, np.where(hit[..., None], x, 0))
    # The gradients (gathers by the inverse map) equal those of plain gathers.
    cot = jax.random.normal(keys[2], got.shape)
    plain = lambda x: jnp.take(x, rows.to_sorted, axis=0, mode="fill", fill_value=0)
    chex.assert_trees_all_close(
        jax.grad(lambda x: jnp.sum(lsh.permute(x, rows.to_sorted, rows.from_sorted) * cot))(
            flat_x),
        jax.grad(lambda x: jnp.sum(plain(x) * cot))(flat_x))
    cot_back = jax.random.normal(keys[3], flat_x.shape)
    plain_back = lambda y: jnp.take(y, rows.from_sorted, axis=0, mode="fill", fill_value=0)
    chex.assert_trees_all_close(
        jax.grad(lambda y: jnp.sum(lsh.permute(y, rows.from_sorted, rows.to_sorted)
                                   * cot_back))(got),
        jax.grad(lambda y: jnp.sum(plain_back(y) * cot_back))(got))


  def test_sorted_rows_pad_and_materialize(self):
    # Rows of a [B=2, n=12, H=3] source in one group of 5 per head (two past the source),
    # padded to 8: the copy is the padded gather, and so is its gradient.
    batch, n, heads, d, m = 2, 12, 3, 4, 5
    keys = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 3)
    perm = jax.vmap(lambda k: jax.random.permutation(k, m))(
        jax.random.split(keys[0], batch * heads)).reshape(batch, 1, heads, m)
    rows = lsh.row_map(perm, [9], n)
    x = jax.random.normal(keys[1], (batch * n * heads, d))
    sorted_rows = lsh.SortedRows(x, rows.to_sorted.reshape(batch, heads, m), rows.from_sorted)
    self.assertEqual(sorted_rows.shape, (batch, heads, m, d))

    def plain(x):
      taken = jnp.take(x, rows.to_sorted, axis=0, mode="fill", fill_value=0)
      return jnp.pad(taken.reshape(batch, heads, m, d), ((0, 0), (0, 0), (0, 3), (0, 0)))

    padded = lambda x: lsh.SortedRows(x, sorted_rows.rows, sorted_rows.inverse).pad(8)
    np.testing.assert_array_equal(padded(x).materialize(), plain(x))
    self.assertEqual(padded(x).shape, (batch, heads, 8, d))
    cot = jax.random.normal(keys[2], (batch, heads, 8, d))
    chex.assert_trees_all_close(
        jax.grad(lambda x: jnp.sum(padded(x).materialize() * cot))(x),
        jax.grad(lambda x: jnp.sum(plain(x) * cot))(x))


class SinkAttentionTest(absltest.TestCase):

  def test_matches_exact_attention_over_the_first_keys(self):
    # Grouped heads; the second batch row has only 2 valid keys, fewer than the 3 sinks.
    batch, q_len, kv_len, q_heads, kv_heads, d, sinks = 2, 9, 11, 4, 2, 8, 3
    keys = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 3)
    q = jax.random.normal(keys[0], (batch, q_len, q_heads, d))
    k, v = (jax.random.normal(key, (batch, kv_len, kv_heads, d)) for key in keys[1:])
    k_pos = positions(batch, kv_heads, kv_len, jnp.array([kv_len, 2]))
    out, lse = sink_attention(q, k, v, k_pos, sink_size=sinks, scale=0.3)
    swap = lambda x: jnp.swapaxes(x, 1, 2)
    want_out, want_lse = exact_attention_bhnd(
        swap(q), swap(k[:, :sinks]), swap(v[:, :sinks]), positions(batch, q_heads, q_len),
        k_pos[:, :, :sinks], causal=False, scale=0.3)
    chex.assert_trees_all_close((swap(out), swap(lse)), (want_out, want_lse), rtol=1e-5,
                                atol=1e-5)


class BlockAttentionTest(parameterized.TestCase):

  @parameterized.product(
      per_block=(False, True),
      rules=((core.NONLOCAL, core.NONLOCAL), (core.LOCAL, core.LOCAL), (core.ALL, core.LOCAL)),
      causal=(False, True),
  )
  def test_matches_brute_force(self, per_block, rules, causal):
    seed = int(np.random.default_rng().integers(1 << 30))
    args = random_primitive_inputs(seed, per_block=per_block, causal=causal)
    spec = core.BlockSpec(block_q=5, block_k=7, causal=causal, diagonal_keys=rules[0],
                          extra_keys=rules[1], sink_size=2, window_size=3)
    out, lse = jax.jit(core.block_attention, static_argnames="spec")(*args, spec=spec, scale=0.4)
    want_out, want_lse = brute_force_block_attention(*args, spec, 0.4)
    chex.assert_trees_all_close((out, lse), (want_out.astype(np.float32),
                                             want_lse.astype(np.float32)), rtol=1e-5, atol=1e-5)

  def test_rows_without_keys_are_zero_with_finite_gradients(self):
    args = list(random_primitive_inputs(0, num_extra=0))
    args[4] = -jnp.ones_like(args[4])  # every key is padding
    spec = core.BlockSpec(block_q=5, block_k=7)

    def loss(q, k, v):
      out, lse = core.block_attention(q, k, v, *args[3:], spec=spec, scale=1.0)
      return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    out, lse = jax.jit(core.block_attention, static_argnames="spec")(*args, spec=spec, scale=1.0)
    np.testing.assert_array_equal(out, 0.0)
    self.assertTrue(np.all(np.isneginf(lse)))
    chex.assert_tree_all_finite(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args[:3]))

  def test_large_logits_and_bf16_stay_finite(self):
    args = list(random_primitive_inputs(1, dtype=jnp.bfloat16))
    spec = core.BlockSpec(block_q=5, block_k=7)
    out, lse = jax.jit(core.block_attention, static_argnames="spec")(*args, spec=spec, scale=1e3)  # logits of order 1e4
    chex.assert_tree_all_finite(out)
    self.assertEqual(out.dtype, jnp.bfloat16)
    self.assertTrue(np.all(np.isfinite(lse) | np.isneginf(lse)))


class ExactAndMergeTest(parameterized.TestCase):

  @parameterized.parameters((False, jnp.float32), (True, jnp.float32), (True, jnp.bfloat16))
  def test_exact_attention_matches_dense(self, causal, dtype):
    key = jax.random.key(np.random.default_rng().integers(1 << 30))
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (2, 37, 4, 16), dtype)
    k = jax.random.normal(kk, (2, 37, 2, 16), dtype)
    v = jax.random.normal(kv, (2, 37, 2, 8), dtype)
    lengths = jnp.array([37, 21])
    q_pos, k_pos = positions(2, 4, 37), positions(2, 2, 37, lengths)
    exact = jax.jit(exact_attention_bhnd, static_argnames=("causal", "query_chunk", "key_chunk"))
    out, _ = exact(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), q_pos, k_pos, causal=causal,
                   scale=0.25, query_chunk=16, key_chunk=8)
    want = jax.nn.dot_product_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), jnp.pad(v, ((0, 0),) * 3 + ((0, 8),)).astype(
            jnp.float32), scale=0.25, is_causal=causal, key_value_seq_lengths=lengths)[..., :8]
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    chex.assert_trees_all_close(jnp.swapaxes(out, 1, 2).astype(jnp.float32), want, rtol=tol,
                                atol=tol)

  def test_merge_of_disjoint_key_sets_is_attention_over_their_union(self):
    rng = np.random.default_rng()
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((1, 2, 20, 8), (1, 2, 30, 8), (1, 2, 30, 5)))
    q_pos = positions(1, 2, 20)
    k_pos = positions(1, 2, 30)
    split = jnp.asarray(rng.random((1, 2, 30)) < 0.3)
    attend = jax.jit(lambda kp: exact_attention_bhnd(q, k, v, q_pos, kp, causal=False, scale=1.0))
    out_a, lse_a = attend(jnp.where(split, k_pos, -1))
    out_b, lse_b = attend(jnp.where(split, -1, k_pos))
    want_out, want_lse = attend(k_pos)
    got_out, got_lse = merge.merge_partials(out_a, lse_a + 0.0, out_b, lse_b)
    chex.assert_trees_all_close((got_out, got_lse), (want_out, want_lse), rtol=1e-5, atol=1e-5)

  def test_merge_with_empty_pieces(self):
    out = jnp.ones((3, 2))
    lse = jnp.array([0.0, -jnp.inf, 50.0])
    empty = jnp.full((3,), -jnp.inf)
    got_out, got_lse = merge.merge_partials(out, lse, jnp.zeros((3, 2)), empty)
    np.testing.assert_array_equal(got_lse, lse)
    np.testing.assert_array_equal(got_out, [[1, 1], [0, 0], [1, 1]])
    grads = jax.grad(lambda a, b: jnp.sum(merge.merge_partials(out, a, out, b)[1]
                                          .clip(-1e9)), argnums=(0, 1))(empty, empty)
    chex.assert_tree_all_finite(grads)
    # Pieces far apart merge without saturating.
    _, far = merge.merge_partials(out, jnp.full((3,), 100.0), out, jnp.full((3,), 0.0))
    np.testing.assert_allclose(far, 100.0 + np.log1p(np.exp(-100.0)), rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
