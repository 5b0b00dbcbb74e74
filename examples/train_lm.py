"""Train a small byte-level causal language model with HyperAttention at long context.

Two models are trained side by side, from the same seed and the same initial weights, on
the same batches: one whose attention layers are ``hyperattention_jax.flax.nnx.
HyperAttention``, and its exact-attention twin (Flax's ``nnx.MultiHeadAttention`` with
``exact_attention_fn``, memory-efficient exact attention). The validation perplexity
(per byte) of both is evaluated periodically, printed, written to ``metrics.json`` and
plotted in ``train_lm.png`` under ``--output_dir``.

Data: the six Jane Austen novels (from the Debian package ``r-cran-janeaustenr``, found or
fetched and cached by ``austen_fetch.py``), with one novel (``--validation_novel``) held
out; or any UTF-8 text with ``--text_file``, whose last 10% is held out.

On the CPU, tiny settings (under two minutes of CPU time; the test runs tinier ones)::

  python3 examples/train_lm.py --seq_len=512 --min_seq_len=256 --block_size=64 \\
      --sample_size=64 --num_layers=2 --model_dim=64 --num_heads=4 --mlp_dim=256 \\
      --batch_size=4 --steps=40 --warmup_steps=5 --learning_rate=3e-3 --eval_every=10 \\
      --eval_batches=2 --output_dir=/tmp/train_lm

On a GPU or TPU, the defaults are the real settings (16k bytes of context; the
HyperAttention layers then split the causal attention into exact leaves of 4096 and two
levels of LSH-sorted blocks with sampled columns)::

  python3 examples/train_lm.py --output_dir=/tmp/train_lm --dtype=bfloat16 \\
      --implementation=mosaic_gpu --exact_implementation=cudnn

Metrics and the plot are rewritten at every validation, so a stopped run keeps them.

Measured (validation perplexity per byte on "Persuasion", HyperAttention / exact):

* CPU, the tiny settings above, Austen novels, jax 0.11.2, 2026-11-30, commit 0539f18:
  step 0: 256.0 / 256.0; step 10: 46.48 / 46.30; step 20: 23.58 / 23.61; step 30:
  22.37 / 22.36; step 40: 22.21 / 22.17 (ratio 1.002). The run took 86 s of user CPU time
  (222 s of wall-clock time on a 2-core machine shared with other jobs, load average
  about 11); median step 0.64 s (HyperAttention) and 0.84 s (exact), at that load.
* GPU (one H200), the real settings with ``--dtype=bfloat16 --implementation=mosaic_gpu
  --exact_implementation=cudnn --steps=160 --eval_every=40``, jax 0.11.2, 2026-11-30,
  commit 4013bb6: step 0: 256.0 / 256.0; step 40: 22.376 / 22.382; step 80: 15.332 /
  15.819; step 120: 12.412 / 12.596; step 160: 12.094 / 12.173 (ratio 0.993). Median step
  157.0 ms (HyperAttention) and 156.7 ms (exact); 111.5 s in all. Metrics in
  ``benchmarks/results/train_lm_h200_4013bb6.json``, plot in ``examples/train_lm_h200.png``.
  An earlier run with the chunked exact twin (commit da8c218, ``--steps=400
  --eval_every=100``) reached 13.25 / 13.56 at step 100 before it was stopped at step 133.
"""

import json
import os
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import hyperattention_jax as ha
from hyperattention_jax.flax import exact_attention_fn
from hyperattention_jax.flax import nnx as ha_nnx

_TEXT_FILE = flags.DEFINE_string("text_file", None,
                                 "UTF-8 text to train on (last 10% validates); the Austen "
                                 "novels when unset.")
_AUSTEN_DIR = flags.DEFINE_string("austen_dir", None,
                                  "Folder with the janeaustenr Rdata.rdb/.rdx; found or "
                                  "fetched when unset (see austen_fetch.py).")
_VALIDATION_NOVEL = flags.DEFINE_string("validation_novel", "persuasion",
                                        "Austen novel held out for validation.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "/tmp/train_lm",
                                  "Where metrics.json and train_lm.png go.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights, the hyperplanes and the batches.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 16384, "Context length in bytes.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per step.")
_STEPS = flags.DEFINE_integer("steps", 2000, "Training steps.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (AdamW).")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 100, "Linear warm-up steps.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 200, "Steps between validations.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "Batches per validation.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Transformer blocks.")
_MODEL_DIM = flags.DEFINE_integer("model_dim", 512, "Model width.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 8, "Query heads.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", None, "Key/value heads (GQA).")
_MLP_DIM = flags.DEFINE_integer("mlp_dim", 2048, "Hidden width of the MLPs.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Computation dtype (parameters stay float32).")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 256, "HyperAttention block size.")
_SAMPLE_SIZE = flags.DEFINE_integer("sample_size", 256, "HyperAttention sampled columns.")
_NUM_PROJECTIONS = flags.DEFINE_integer("num_projections", 7, "LSH hyperplanes.")
_MIN_SEQ_LEN = flags.DEFINE_integer("min_seq_len", 4096,
                                    "Length of the exact causal leaves of HyperAttention.")
_SINK_SIZE = flags.DEFINE_integer("sink_size", 4, "First keys attended exactly.")
_WINDOW_SIZE = flags.DEFINE_integer("window_size", 0, "Local window attended exactly.")
_IMPLEMENTATION = flags.DEFINE_string("implementation", None,
                                      "HyperAttention core implementation (best when unset; on a "
                                      "GPU that is exact attention below the break-even length, "
                                      "so name 'mosaic_gpu' there).")
_EXACT_IMPLEMENTATION = flags.DEFINE_enum(
    "exact_implementation", "chunked", ["chunked", "cudnn"],
    "The exact twin's attention: 'chunked' (hyperattention_jax.exact_attention, anywhere) or "
    "'cudnn' (jax.nn.dot_product_attention's cuDNN kernel; GPU, 16-bit dtypes).")

VOCAB_SIZE = 256  # bytes


def encode(text: str) -> np.ndarray:
  return np.frombuffer(text.encode("utf-8"), np.uint8)


def load_corpus():
  """Training and validation bytes."""
  if _TEXT_FILE.value:
    with open(_TEXT_FILE.value, encoding="utf-8") as f:
      data = encode(f.read())
    split = int(0.9 * len(data))
    return data[:split], data[split:]
  import austen_fetch  # pylint: disable=import-outside-toplevel
  novels = austen_fetch.novels(data_dir=_AUSTEN_DIR.value)
  if _VALIDATION_NOVEL.value not in novels:
    raise app.UsageError(f"--validation_novel={_VALIDATION_NOVEL.value} is not one of "
                         f"{sorted(novels)}.")
  validation = novels.pop(_VALIDATION_NOVEL.value)
  return encode("\n\n\n".join(novels.values())), encode(validation)


def random_windows(data, rng: np.random.Generator, batch_size: int, length: int):
  """``[batch_size, length + 1]`` int32 windows at random offsets."""
  starts = rng.integers(0, len(data) - length - 1, batch_size)
  return np.stack([data[s:s + length + 1] for s in starts]).astype(np.int32)


def validation_batches(data, num_batches: int, batch_size: int, length: int):
  """Fixed windows spread evenly over ``data``, ``num_batches`` of ``[batch_size, length + 1]``."""
  starts = np.linspace(0, len(data) - length - 1, num_batches * batch_size).astype(np.int64)
  windows = np.stack([data[s:s + length + 1] for s in starts]).astype(np.int32)
  return windows.reshape(num_batches, batch_size, length + 1)


class Block(nnx.Module):
  """Pre-norm transformer block: causal attention, then a GELU MLP."""

  def __init__(self, attention: nnx.Module, dim: int, mlp_dim: int, *, dtype, rngs: nnx.Rngs):
    self.attention_norm = nnx.RMSNorm(dim, dtype=dtype, rngs=rngs)
    self.attention = attention
    self.mlp_norm = nnx.RMSNorm(dim, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    # Both attention layers take is_causal at the call, as nnx.MultiHeadAttention does.
    x = x + self.attention(self.attention_norm(x), is_causal=True)
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class ByteLM(nnx.Module):
  """A byte-level causal language model with learned positions.

  Args:
    make_attention: ``rngs -> attention layer`` (called once per block).
    seq_len: longest input.
    num_layers, dim, mlp_dim: sizes.
    dtype: computation dtype.
    rngs: ``nnx.Rngs``.
  """

  def __init__(self, make_attention, *, seq_len: int, num_layers: int, dim: int, mlp_dim: int,
               dtype, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB_SIZE, dim, dtype=dtype, rngs=rngs)
    self.position = nnx.Embed(seq_len, dim, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(make_attention(rngs), dim, mlp_dim, dtype=dtype, rngs=rngs)
                            for _ in range(num_layers)])
    self.final_norm = nnx.RMSNorm(dim, dtype=dtype, rngs=rngs)
    # A zero read-out: every model starts at perplexity 256 (uniform over bytes).
    self.readout = nnx.Linear(dim, VOCAB_SIZE, kernel_init=nnx.initializers.zeros_init(),
                              dtype=dtype, rngs=rngs)

  def __call__(self, tokens):
    """``[batch, length]`` int tokens -> ``[batch, length, 256]`` float32 logits."""
    x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[-1]))
    for block in self.blocks:
      x = block(x)
    return self.readout(self.final_norm(x)).astype(jnp.float32)


def cudnn_attention_fn(query, key, value, *, mask=None, is_causal: bool = False,
                       **unused_kwargs):
  """Causal exact attention through cuDNN, for ``nnx.MultiHeadAttention``'s attention_fn."""
  if mask is not None:
    raise ValueError("cudnn_attention_fn takes is_causal, not a mask.")
  return jax.nn.dot_product_attention(query, key, value, is_causal=is_causal,
                                      implementation="cudnn")


def build_models(dtype):
  """The HyperAttention model and its exact twin, with equal initial weights."""
  config = ha.HyperAttentionConfig(block_size=_BLOCK_SIZE.value, sample_size=_SAMPLE_SIZE.value,
                                   num_projections=_NUM_PROJECTIONS.value,
                                   min_seq_len=_MIN_SEQ_LEN.value, sink_size=_SINK_SIZE.value,
                                   window_size=_WINDOW_SIZE.value)
  sizes = dict(seq_len=_SEQ_LEN.value, num_layers=_NUM_LAYERS.value, dim=_MODEL_DIM.value,
               mlp_dim=_MLP_DIM.value, dtype=dtype)
  heads = dict(num_heads=_NUM_HEADS.value, in_features=_MODEL_DIM.value,
               num_kv_heads=_NUM_KV_HEADS.value, dtype=dtype)
  hyper = ByteLM(
      lambda rngs: ha_nnx.HyperAttention(**heads, config=config,
                                         implementation=_IMPLEMENTATION.value, rngs=rngs),
      **sizes, rngs=nnx.Rngs(params=_SEED.value, hyper_attention=_SEED.value + 1))
  exact_fn = (exact_attention_fn if _EXACT_IMPLEMENTATION.value == "chunked"
              else cudnn_attention_fn)
  exact = ByteLM(
      lambda rngs: nnx.MultiHeadAttention(**heads, attention_fn=exact_fn, decode=False,
                                          rngs=rngs),
      **sizes, rngs=nnx.Rngs(params=_SEED.value))
  # The hyperplanes drawn in each HyperAttention layer shift the later draws of the params
  # stream, so copy the weights over: both models start from the same point.
  nnx.update(exact, nnx.state(hyper, nnx.Param))
  return {"hyper": hyper, "exact": exact}


def loss_fn(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def train_step(model, optimizer, tokens):
  loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model, tokens):
  return loss_fn(model, tokens)


def validation_perplexity(model, batches) -> float:
  losses = [float(eval_step(model, jnp.asarray(tokens))) for tokens in batches]
  return float(np.exp(np.mean(losses)))


def plot(evaluations, path: str, title: str):
  """Validation perplexity of both models, and their ratio, against the step."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  steps = [e["step"] for e in evaluations]
  fig, (curves, ratio) = plt.subplots(1, 2, figsize=(11, 4.5))
  for name, label in (("hyper", "HyperAttention"), ("exact", "exact attention")):
    curves.plot(steps, [e[name] for e in evaluations], marker="o", label=label)
  curves.set_yscale("log")
  curves.set_ylabel("validation perplexity (per byte)")
  curves.legend()
  ratio.plot(steps, [e["hyper"] / e["exact"] for e in evaluations], marker="o", color="C2")
  ratio.axhline(1.0, color="gray", lw=0.8)
  ratio.set_ylabel("perplexity ratio, HyperAttention / exact")
  for ax in (curves, ratio):
    ax.set_xlabel("training step")
    ax.grid(True, which="both", alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  seq_len, batch_size, steps = _SEQ_LEN.value, _BATCH_SIZE.value, _STEPS.value
  train_data, validation_data = load_corpus()
  for name, data in (("training", train_data), ("validation", validation_data)):
    if len(data) <= seq_len + 1:
      raise app.UsageError(f"The {name} text has {len(data)} bytes; --seq_len={seq_len} needs "
                           "more.")
  dtype = jnp.dtype(_DTYPE.value)
  models = build_models(dtype)
  schedule = optax.warmup_cosine_decay_schedule(0.0, _LEARNING_RATE.value, _WARMUP_STEPS.value,
                                                max(steps, _WARMUP_STEPS.value + 1),
                                                end_value=0.1 * _LEARNING_RATE.value)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
  optimizers = {name: nnx.Optimizer(model, tx, wrt=nnx.Param) for name, model in models.items()}
  batches = validation_batches(validation_data, _EVAL_BATCHES.value, batch_size, seq_len)
  rng = np.random.default_rng(_SEED.value)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(models["hyper"], nnx.Param)))
  print(f"{len(train_data):,} training bytes, {len(validation_data):,} validation bytes; "
        f"{num_params:,} parameters; backend {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}).")

  evaluations, train_losses = [], []
  step_times = {name: [] for name in models}

  start = time.time()

  def write_outputs():
    """metrics.json and train_lm.png so far (written at every validation)."""
    # The first step of each model includes its compilation.
    seconds_per_step = {name: float(np.median(t[1:])) if len(t) > 1 else float(t[0])
                        for name, t in step_times.items() if t}
    summary = {
        "flags": {holder.name: holder.value for holder in globals().values()
                  if isinstance(holder, flags.FlagHolder)},
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "num_params": int(num_params),
        "evaluations": evaluations,
        "train_losses": train_losses,
        "median_seconds_per_step": seconds_per_step,
        "total_seconds": time.time() - start,
    }
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUTPUT_DIR.value, "metrics.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
    title = (f"byte-level LM, context {seq_len}, {_NUM_LAYERS.value} layers x "
             f"{_MODEL_DIM.value}, batch {batch_size}, {jax.default_backend()}\nHyperAttention: "
             f"block {_BLOCK_SIZE.value}, {_SAMPLE_SIZE.value} samples, leaves "
             f"{_MIN_SEQ_LEN.value}, sink {_SINK_SIZE.value}, window {_WINDOW_SIZE.value}")
    plot(evaluations, os.path.join(_OUTPUT_DIR.value, "train_lm.png"), title)
    return summary

  def evaluate(step):
    record = {"step": step}
    record.update({name: validation_perplexity(model, batches) for name, model in models.items()})
    evaluations.append(record)
    tqdm.write(f"step {step:6d}  validation perplexity: HyperAttention {record['hyper']:.3f}, "
               f"exact {record['exact']:.3f}")
    return write_outputs()

  summary = evaluate(0)
  progress = tqdm(range(1, steps + 1), desc="training", unit="step")
  for step in progress:
    tokens = jnp.asarray(random_windows(train_data, rng, batch_size, seq_len))
    losses = {}
    for name, model in models.items():
      t = time.perf_counter()
      losses[name] = float(train_step(model, optimizers[name], tokens))
      step_times[name].append(time.perf_counter() - t)
    train_losses.append({"step": step, **losses})
    progress.set_postfix(hyper=f"{losses['hyper']:.3f}", exact=f"{losses['exact']:.3f}")
    if step % _EVAL_EVERY.value == 0 or step == steps:
      summary = evaluate(step)
  seconds_per_step, total = summary["median_seconds_per_step"], summary["total_seconds"]
  final = evaluations[-1]
  print(f"final validation perplexity: HyperAttention {final['hyper']:.3f}, exact "
        f"{final['exact']:.3f} (ratio {final['hyper'] / final['exact']:.3f}); median step: "
        f"HyperAttention {seconds_per_step['hyper'] * 1e3:.1f} ms, exact "
        f"{seconds_per_step['exact'] * 1e3:.1f} ms; total {total:.1f} s. "
        f"Wrote {_OUTPUT_DIR.value}/metrics.json and train_lm.png.")


if __name__ == "__main__":
  app.run(main)
