"""A sharded training step of a small causal language model with HyperAttention.

The batch, the heads and the sequence are split over a device mesh with axes ``data``,
``heads`` and ``seq``: token batches are placed as ``P("data", "seq")``, the attention
projections are split along their heads (tensor parallelism), and every attention layer
calls ``sharded_hyper_attention``, whose sequence parallelism swaps the sequence split for
a head split with an all-to-all. Before training, the loss and the gradients of the
sharded step are checked against the same step computed without a mesh on one device
(with the same random draws the two must agree to rounding).

On a CPU, ask XLA for several host devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. \
      python3 examples/sharded_train_step.py --data_parallel=2 --seq_parallel=4

On GPUs the mesh takes the visible devices (``--seq_parallel=-1`` takes all the devices
that the other two axes leave).

The data is synthetic: a Markov chain in which each token has four equally likely
successors, so the loss can fall from ``log(vocab)`` to ``log(4)``.
"""

import functools
import time

from absl import app
from absl import flags
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax

import hyperattention_jax as ha
from hyperattention_jax.sharding import activation_spec, sharded_hyper_attention

_DATA_PARALLEL = flags.DEFINE_integer("data_parallel", 1, "Devices splitting the batch.")
_HEAD_PARALLEL = flags.DEFINE_integer("head_parallel", 1, "Devices splitting the heads.")
_SEQ_PARALLEL = flags.DEFINE_integer(
    "seq_parallel", -1, "Devices splitting the sequence; -1: all the devices left.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step (global).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per sequence.")
_VOCAB = flags.DEFINE_integer("vocab", 64, "Vocabulary size.")
_MODEL_DIM = flags.DEFINE_integer("model_dim", 64, "Width of the residual stream.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads per layer.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "Key/value heads per layer.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 16, "Head dimension.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Transformer layers.")
_STEPS = flags.DEFINE_integer("steps", 20, "Training steps.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-2, "AdamW learning rate.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 32, "HyperAttentionConfig.block_size.")
_SAMPLE_SIZE = flags.DEFINE_integer("sample_size", 32, "HyperAttentionConfig.sample_size.")
_MIN_SEQ_LEN = flags.DEFINE_integer("min_seq_len", 256, "HyperAttentionConfig.min_seq_len.")
_CHECK = flags.DEFINE_boolean("check", True, "Check the sharded step against one device.")


def init_params(key, *, vocab, model_dim, heads, kv_heads, head_dim, layers):
  """Parameters of a pre-norm decoder; attention weights carry an explicit heads axis."""
  def dense(k, shape, fan_in):
    return jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)
  keys = iter(jax.random.split(key, 2 + 6 * layers))
  params = {"embed": dense(next(keys), (vocab, model_dim), 1.0), "layers": []}
  for _ in range(layers):
    params["layers"].append({
        "wq": dense(next(keys), (model_dim, heads, head_dim), model_dim),
        "wk": dense(next(keys), (model_dim, kv_heads, head_dim), model_dim),
        "wv": dense(next(keys), (model_dim, kv_heads, head_dim), model_dim),
        "wo": dense(next(keys), (heads, head_dim, model_dim), heads * head_dim),
        "w_in": dense(next(keys), (model_dim, 4 * model_dim), model_dim),
        "w_out": dense(next(keys), (4 * model_dim, model_dim), 4 * model_dim),
    })
  params["unembed"] = dense(next(keys), (model_dim, vocab), model_dim)
  return params


def param_specs(params, *, split_kv_heads):
  """Attention projections split along their heads axis; everything else replicated."""
  kv = P(None, "heads", None) if split_kv_heads else P()
  layer = {"wq": P(None, "heads", None), "wk": kv, "wv": kv, "wo": P("heads", None, None),
           "w_in": P(), "w_out": P()}
  return {"embed": P(), "layers": [layer] * len(params["layers"]), "unembed": P()}


def rms_norm(x):
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)


def loss_fn(params, tokens, rng, *, attention):
  """Mean next-token cross-entropy; ``attention(q, k, v, rng)`` is the attention function."""
  x = params["embed"][tokens]
  for index, layer in enumerate(params["layers"]):
    h = rms_norm(x)
    q = jnp.einsum("bnd,dhk->bnhk", h, layer["wq"])
    k = jnp.einsum("bnd,dhk->bnhk", h, layer["wk"])
    v = jnp.einsum("bnd,dhk->bnhk", h, layer["wv"])
    # Each layer draws its own hyperplanes and samples.
    o = attention(q, k, v, jax.random.fold_in(rng, index))
    x = x + jnp.einsum("bnhk,hkd->bnd", o, layer["wo"])
    x = x + jax.nn.gelu(rms_norm(x) @ layer["w_in"]) @ layer["w_out"]
  logits = rms_norm(x) @ params["unembed"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                                  tokens[:, 1:]))


def synthetic_batch(key, batch, seq_len, vocab):
  """``[batch, seq_len]`` int32 tokens: ``x[t + 1] = (5 x[t] + c[t]) % vocab``, ``c`` in 0..3."""
  start_key, step_key = jax.random.split(key)
  start = jax.random.randint(start_key, (batch,), 0, vocab, jnp.int32)
  steps = jax.random.randint(step_key, (seq_len - 1, batch), 0, 4, jnp.int32)

  def advance(x, c):
    x = (5 * x + c) % vocab
    return x, x

  _, rest = jax.lax.scan(advance, start, steps)
  return jnp.concatenate([start[:, None], rest.T], axis=1)


def make_mesh():
  devices = jax.device_count()
  data, heads, seq = _DATA_PARALLEL.value, _HEAD_PARALLEL.value, _SEQ_PARALLEL.value
  if seq == -1:
    seq = devices // (data * heads)
  if data * heads * seq != devices:
    raise app.UsageError(
        f"data_parallel * head_parallel * seq_parallel = {data} * {heads} * {seq} must equal "
        f"the {devices} devices (on a CPU set XLA_FLAGS="
        "--xla_force_host_platform_device_count=N before starting).")
  return jax.make_mesh((data, heads, seq), ("data", "heads", "seq"),
                       axis_types=(AxisType.Auto,) * 3)


def main(argv):
  del argv
  mesh = make_mesh()
  config = ha.HyperAttentionConfig(block_size=_BLOCK_SIZE.value, sample_size=_SAMPLE_SIZE.value,
                                   min_seq_len=_MIN_SEQ_LEN.value)
  # Listing the implementations loads the kernels before anything is traced; loading
  # them inside the first trace changes JAX's configuration and the step would compile twice.
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} devices, "
        f"implementations {ha.available_implementations()}; {config}")

  def sharded_attention(q, k, v, rng):
    return sharded_hyper_attention(q, k, v, mesh=mesh, batch_axis="data", head_axis="heads",
                                   seq_axis="seq", rng=rng, is_causal=True, config=config)

  def plain_attention(q, k, v, rng):
    return ha.hyper_attention(q, k, v, rng=rng, is_causal=True, config=config)

  params = init_params(jax.random.key(0), vocab=_VOCAB.value, model_dim=_MODEL_DIM.value,
                       heads=_HEADS.value, kv_heads=_KV_HEADS.value, head_dim=_HEAD_DIM.value,
                       layers=_LAYERS.value)
  specs = param_specs(params, split_kv_heads=_KV_HEADS.value % mesh.shape["heads"] == 0)
  param_sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
  params = jax.device_put(params, param_sharding)
  token_sharding = NamedSharding(mesh, P("data", "seq"))
  optimizer = optax.adamw(_LEARNING_RATE.value)
  opt_state = optimizer.init(params)
  sharded_loss = functools.partial(loss_fn, attention=sharded_attention)

  # Fixed output shardings keep the step's signature stable across steps (no recompiling).
  # (optax's step counter starts on one device: replicate it over the mesh.)
  opt_sharding = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding)
                              else NamedSharding(mesh, P()), opt_state)
  opt_state = jax.device_put(opt_state, opt_sharding)

  @functools.partial(jax.jit, donate_argnums=(0, 1),
                     out_shardings=(param_sharding, opt_sharding, None))
  def train_step(params, opt_state, tokens, rng):
    loss, grads = jax.value_and_grad(sharded_loss)(params, tokens, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  data_key, step_key = jax.random.split(jax.random.key(1))

  def batch_at(step):
    tokens = synthetic_batch(jax.random.fold_in(data_key, step), _BATCH.value, _SEQ_LEN.value,
                             _VOCAB.value)
    return jax.device_put(tokens, token_sharding)

  if _CHECK.value:
    tokens, rng = batch_at(0), jax.random.fold_in(step_key, 0)
    loss, grads = jax.jit(jax.value_and_grad(sharded_loss))(params, tokens, rng)
    one_device = jax.devices()[0]
    want_loss, want_grads = jax.jit(jax.value_and_grad(
        functools.partial(loss_fn, attention=plain_attention)))(
            jax.device_put(params, one_device), jax.device_put(tokens, one_device), rng)
    grad_error = max(float(jnp.max(jnp.abs(jax.device_put(g, one_device) - w))
                           / (jnp.max(jnp.abs(w)) + 1e-30))
                     for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)))
    print(f"check against one device: loss {float(loss):.6f} vs {float(want_loss):.6f}, "
          f"largest gradient difference {grad_error:.2e} (relative to the leaf's largest entry)")
    # Head-split output projections sum over devices in another order; the rounding can
    # move a row across an LSH hyperplane in the next layer, so allow more than rounding.
    assert abs(float(loss) - float(want_loss)) < 1e-4 * max(1.0, abs(float(want_loss)))

  spec = activation_spec(batch_axis="data", seq_axis="seq", head_axis="heads")
  print(f"attention inputs [batch, seq, heads, head_dim] split as {spec}")
  start = time.perf_counter()
  for step in range(_STEPS.value):
    params, opt_state, loss = train_step(params, opt_state, batch_at(step),
                                         jax.random.fold_in(step_key, step))
    if step == 0 or (step + 1) % 10 == 0:
      print(f"step {step + 1:4d}  loss {float(loss):.4f}  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  app.run(main)
