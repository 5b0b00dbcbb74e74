"""HyperAttention against exact attention at a long length: error and time.

Runs on whatever JAX backend is present (the CPU by default):

  python3 examples/demo.py
  python3 examples/demo.py --seq_len=32768 --causal --heads=8
  python3 examples/demo.py --preset=paper --sample_size=512

The inputs are synthetic but structured like real attention: every token's query and
key lie near one of many cluster centres, so each query attends mostly to its own
cluster (``--data=gaussian`` gives i.i.d. normal inputs instead, whose attention is
nearly uniform).

The relative error is reported over the whole output and per row (median and 90th
percentile): a query whose cluster straddles the boundary of its LSH-sorted block sees part
of the cluster only through the sampled columns, and such rows carry much larger errors
than the rest. ``--preset`` picks one of ``ha.PRESETS`` (the flags below adjust it).
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import hyperattention_jax as ha

_SEQ_LEN = flags.DEFINE_integer("seq_len", 16384, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 4, "Key/value heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_CAUSAL = flags.DEFINE_boolean("causal", False, "Causal self-attention.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")
_DATA = flags.DEFINE_enum("data", "clustered", ["clustered", "gaussian"], "Input kind.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of each function (median reported).")
_PRESET = flags.DEFINE_enum("preset", "default", list(ha.PRESETS),
                            "Named configuration (ha.PRESETS) that the flags below adjust.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", None, "HyperAttentionConfig.block_size "
                                   "(default: the preset's).")
_SAMPLE_SIZE = flags.DEFINE_integer("sample_size", None, "HyperAttentionConfig.sample_size "
                                    "(default: the preset's).")
_MIN_SEQ_LEN = flags.DEFINE_integer("min_seq_len", None, "HyperAttentionConfig.min_seq_len "
                                    "(default: the preset's).")
_IMPLEMENTATION = flags.DEFINE_string("implementation", None,
                                      "Core implementation (None: best for the backend).")


def make_inputs(key, shape, kv_heads, data, dtype):
  """Query, key and value ``[batch, seq, heads, head_dim]``."""
  batch, seq_len, heads, head_dim = shape
  k_centres, k_assign, k_q, k_k, k_v = jax.random.split(key, 5)
  kv_shape = (batch, seq_len, kv_heads, head_dim)
  value = jax.random.normal(k_v, kv_shape, dtype)
  if data == "gaussian":
    return (jax.random.normal(k_q, shape, dtype), jax.random.normal(k_k, kv_shape, dtype), value)
  num_clusters = max(seq_len // 16, 1)
  centres = jax.random.normal(k_centres, (num_clusters, head_dim))
  # A query's logit with keys of its own cluster is log(seq_len) + 4 (at scale 1/sqrt(d)),
  # so its cluster holds most of its attention, as heads of trained models often do.
  radius = np.sqrt((np.log(seq_len) + 4.0) * np.sqrt(head_dim))
  centres = radius * centres / jnp.linalg.norm(centres, axis=-1, keepdims=True)
  cluster = jax.random.randint(k_assign, (batch, seq_len, 1), 0, num_clusters)
  query = centres[cluster] + 0.02 * jax.random.normal(k_q, shape)
  key_ = centres[cluster] + 0.02 * jax.random.normal(k_k, kv_shape)
  return query.astype(dtype), key_.astype(dtype), value


def median_time(fn, args, repeats, label):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in tqdm(range(repeats), desc=label, leave=False):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  shape = (_BATCH.value, _SEQ_LEN.value, _HEADS.value, _HEAD_DIM.value)
  query, key, value = make_inputs(jax.random.key(0), shape, _KV_HEADS.value, _DATA.value, dtype)
  changes = dict(block_size=_BLOCK_SIZE.value, sample_size=_SAMPLE_SIZE.value,
                 min_seq_len=_MIN_SEQ_LEN.value)
  config = ha.PRESETS[_PRESET.value].replace(
      **{name: value for name, value in changes.items() if value is not None})
  causal = _CAUSAL.value

  hyper = jax.jit(lambda q, k, v: ha.hyper_attention(
      q, k, v, rng=jax.random.key(1), is_causal=causal, config=config,
      implementation=_IMPLEMENTATION.value))
  exact = jax.jit(lambda q, k, v: ha.exact_attention(q, k, v, is_causal=causal))

  print(f"backend={jax.default_backend()} implementations={ha.available_implementations()}")
  print(f"shape [batch, seq, heads, head_dim]={shape} kv_heads={_KV_HEADS.value} dtype={dtype} "
        f"causal={causal} data={_DATA.value}")
  print(f"{config}")
  args = (query, key, value)
  exact_time = median_time(exact, args, _REPEATS.value, "exact attention")
  hyper_time = median_time(hyper, args, _REPEATS.value, "hyper_attention")
  out = np.asarray(hyper(*args), np.float64)
  want = np.asarray(exact(*args), np.float64)
  error = np.linalg.norm(out - want) / np.linalg.norm(want)
  row_error = np.linalg.norm(out - want, axis=-1) / np.linalg.norm(want, axis=-1)
  print(f"exact attention : {exact_time * 1e3:10.1f} ms")
  print(f"hyper_attention : {hyper_time * 1e3:10.1f} ms   ({exact_time / hyper_time:.1f}x faster)")
  print(f"relative error of hyper_attention vs exact: {error:.4f} over the whole output; "
        f"per row: median {np.median(row_error):.4f}, 90th percentile "
        f"{np.quantile(row_error, 0.9):.4f}")


if __name__ == "__main__":
  app.run(main)
