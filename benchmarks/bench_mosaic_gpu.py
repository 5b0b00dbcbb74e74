r"""hyper_attention against fast exact attention on one accelerator.

For every length, causal setting and pass (forward; forward+backward) the script prints the
median time per call of each implementation (calls queued back to back, ``--queued`` per
sample; single synchronised calls are timed too), the speedup of hyper_attention over exact
attention, and the relative error ``||o - o_exact|| / ||o_exact||`` of hyper_attention's
output, under a progress bar over the points. It writes a JSON file, a markdown table and a
PNG plot of time against length.

The exact baseline follows the backend: cuDNN's fused attention on a GPU, JAX's Pallas
flash attention on a TPU, ``exact_attention`` elsewhere; "auto" is hyper_attention's own
choice of implementation, so the script runs unchanged on a GPU or a TPU.

  PYTHONPATH=. python3 benchmarks/bench_mosaic_gpu.py --out_dir=/tmp/bench
"""

import functools
import json
import math
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from tqdm import tqdm

import hyperattention_jax as ha

from benchmarks.timing import device_op_ms, median_ms, ms_by_scope

_LENGTHS = flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768", "65536", "131072"],
                             "Sequence lengths.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 32, "Attention heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", None, "Key/value heads (GQA); default: --heads.")
_PRESET = flags.DEFINE_enum("preset", "default", list(ha.PRESETS),
                            "hyper_attention's configuration: HyperAttentionConfig(), "
                            "ha.PAPER_CONFIG or ha.PRETRAINED_LM_CONFIG.")
_IMPLS = flags.DEFINE_list(
    "implementations", ["auto", "xla", "exact"],
    "What to time: 'auto' (hyper_attention's default dispatch: the Mosaic GPU kernels on "
    "Hopper, exact cuDNN below the break-even length; the Mosaic TPU kernels on a TPU), "
    "'mosaic_gpu' / 'mosaic_tpu' (the kernels at every length above min_seq_len), 'xla' "
    "(the pure-JAX reference), 'exact' (the backend's fast exact attention; 'cudnn' is its "
    "name on a GPU).")

# Names of the exact baseline in results (older result files call it "cudnn").
EXACT = ("exact", "cudnn")


def exact_attention_fn(causal):
  """The backend's fastest exact attention, ``(q, k, v) -> o`` in ``[batch, seq, heads, dim]``."""
  backend = jax.default_backend()
  if backend == "gpu":
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                             implementation="cudnn")
  if backend == "tpu":
    from jax.experimental.pallas.ops.tpu import flash_attention  # pylint: disable=import-outside-toplevel

    def tpu_flash(q, k, v):
      swap = lambda x: jnp.swapaxes(x, 1, 2)  # the op's layout is [batch, heads, seq, dim]
      groups = q.shape[2] // k.shape[2]  # the op wants as many key/value heads as queries
      k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
      return swap(flash_attention.flash_attention(swap(q), swap(k), swap(v), causal=causal,
                                                  sm_scale=q.shape[-1]**-0.5))
    return tpu_flash
  return functools.partial(ha.exact_attention, is_causal=causal)
_PASSES = flags.DEFINE_list("passes", ["fwd", "fwd_bwd"], "Passes to time.")
_CAUSAL = flags.DEFINE_list("causal", ["false", "true"], "Causal settings.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed samples (fewer for slow points).")
_QUEUED = flags.DEFINE_integer(
    "queued", 4, "Calls dispatched back to back per timing sample: the time per call of a "
    "stream of calls, as a training loop makes them (column 'ms'). Every point is also "
    "timed as single synchronised calls, host dispatch and synchronisation included "
    "(column 'sync ms').")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 6.0, "Time budget per measured point.")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Directory for results.json, table.md, plot.png.")
_PROFILE = flags.DEFINE_integer(
    "profile", 0, "Also trace each hyper_attention point and print its device time by stage "
    "and its this many most costly XLA ops. Turns off XLA's command buffers (CUDA graphs) so "
    "that every op shows in the trace; times measured in such a run can differ a little.")
_REPORT = flags.DEFINE_list("report", [], "Measure nothing: merge these results.json files "
                            "into a table and a plot in --out_dir.")


def attention_fn(impl, causal):
  """``(q, k, v) -> o`` in ``[batch, seq, heads, dim]``."""
  if impl in EXACT:
    return exact_attention_fn(causal)
  return functools.partial(ha.hyper_attention, rng=jax.random.key(0), is_causal=causal,
                           config=ha.PRESETS[_PRESET.value],
                           implementation=None if impl == "auto" else impl)


def fwd_bwd_fn(attend):
  def loss(q, k, v, d_out):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) * d_out.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def relative_error(out, exact):
  out, exact = out.astype(jnp.float32), exact.astype(jnp.float32)
  return float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact))


# The pipeline's jax.named_scope stages (see hyperattention_jax), outermost first.
STAGES = ("lsh_hash", "lsh_sort", "lsh_gather", "core_primitive", "lsh_unsort", "exact_local",
          "merge")


def profile(row, fn, args, label):
  """Adds device time by stage and by op to ``row`` and prints them."""
  by_op = device_op_ms(fn, *args)
  total = sum(by_op.values())
  by_stage = ms_by_scope(by_op, fn.lower(*args).compile().as_text(), STAGES)
  row.update(device_ms=total, device_ms_by_stage=by_stage, device_ms_by_op=by_op)
  tqdm.write(f"{label} device time {total:.3f} ms by stage: " + ", ".join(
      f"{name} {ms:.3f}" for name, ms in sorted(by_stage.items(), key=lambda x: -x[1])))
  for op, op_ms in list(by_op.items())[:_PROFILE.value]:
    tqdm.write(f"    {op_ms:8.3f} ms  {100 * op_ms / total:5.1f}%  {op}")


def measure_point(n, causal, results, progress):
  shape = (_BATCH.value, n, _HEADS.value, _HEAD_DIM.value)
  kv_shape = (_BATCH.value, n, _KV_HEADS.value or _HEADS.value, _HEAD_DIM.value)
  keys = jax.random.split(jax.random.key(n + causal), 4)
  q, k, v, d_out = (jax.random.normal(key, s, jnp.float32).astype(jnp.bfloat16)
                    for key, s in zip(keys, (shape, kv_shape, kv_shape, shape)))
  exact_out = None
  if any(impl in EXACT for impl in _IMPLS.value):
    exact_out = jax.jit(exact_attention_fn(causal))(q, k, v)
  for impl in _IMPLS.value:
    for pass_name in _PASSES.value:
      label = f"n={n:6d} causal={causal!s:5s} {pass_name:7s} {impl:10s}"
      progress.set_postfix_str(label.strip())
      attend = attention_fn(impl, causal)
      try:
        t0 = time.perf_counter()
        if pass_name == "fwd":
          fn = jax.jit(attend)
          out = jax.block_until_ready(fn(q, k, v))
          args = (q, k, v)
        else:
          fn = fwd_bwd_fn(attend)
          jax.block_until_ready(fn(q, k, v, d_out))
          args = (q, k, v, d_out)
        first = time.perf_counter() - t0
        ms, sync_ms = (median_ms(fn, *args, reps=_REPS.value, warmup=1,
                                 max_seconds=_MAX_SECONDS.value, queued=queued)
                       for queued in (_QUEUED.value, 1))
      except Exception as e:  # pylint: disable=broad-except
        tqdm.write(f"{label} ERROR {type(e).__name__}: {str(e)[:1500]}")
        progress.update()
        continue
      row = dict(n=n, causal=causal, pass_name=pass_name, impl=impl, ms=ms, sync_ms=sync_ms,
                 queued=_QUEUED.value, first_call_s=first)
      if pass_name == "fwd" and impl not in EXACT and exact_out is not None:
        row["rel_error_vs_exact"] = relative_error(out, exact_out)
      if _PROFILE.value and impl not in EXACT:
        profile(row, fn, args, label)
      results.append(row)
      if _OUT_DIR.value:  # keep what was measured even if a later point is cut short
        os.makedirs(_OUT_DIR.value, exist_ok=True)
        with open(os.path.join(_OUT_DIR.value, "results.json"), "w", encoding="utf-8") as f:
          json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                         preset=_PRESET.value, config=str(ha.PRESETS[_PRESET.value]),
                         kv_heads=_KV_HEADS.value or _HEADS.value, results=results), f,
                    indent=1)
      err = f" rel.err {row['rel_error_vs_exact']:.3f}" if "rel_error_vs_exact" in row else ""
      tqdm.write(f"{label} {ms:10.3f} ms  (synchronised {sync_ms:9.3f} ms; "
                 f"first call {first:5.1f} s){err}")
      progress.update()


def table(results):
  """Markdown table: one row per (n, causal, pass); times, speedups and errors per impl.

  Speedups use the queued time per call ('ms'), rounded down (two decimals below 10x);
  where the rows have them, the speedups of single synchronised calls ('sync ms') follow.
  """
  impls = [i for i in dict.fromkeys(r["impl"] for r in results) if i not in EXACT]
  lookup = {(r["n"], r["causal"], r["pass_name"], r["impl"]): r for r in results}
  with_sync = any("sync_ms" in r for r in results)
  header = (["n", "causal", "pass", "exact ms"] + [f"{i} ms" for i in impls]
            + [f"{i} speedup" for i in impls]
            + ([f"{i} sync speedup" for i in impls] if with_sync else [])
            + [f"{i} rel. error" for i in impls])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

  def speedup(base, row, key):
    if not (base and row and key in base and key in row):
      return "-"
    ratio = base[key] / row[key]  # rounded down, so 2.998x does not read as 3.0x
    return (f"{math.floor(ratio * 100) / 100:.2f}x" if ratio < 10
            else f"{math.floor(ratio * 10) / 10:.1f}x")

  for n, causal, pass_name in sorted({(r["n"], r["causal"], r["pass_name"]) for r in results}):
    get = lambda impl, n=n, c=causal, p=pass_name: lookup.get((n, c, p, impl))
    baseline = get("exact") or get("cudnn")
    cells = [str(n), str(causal), pass_name, f"{baseline['ms']:.2f}" if baseline else "-"]
    cells += [f"{get(i)['ms']:.2f}" if get(i) else "-" for i in impls]
    cells += [speedup(baseline, get(i), "ms") for i in impls]
    if with_sync:
      cells += [speedup(baseline, get(i), "sync_ms") for i in impls]
    cells += [f"{get(i)['rel_error_vs_exact']:.3f}"
              if get(i) and "rel_error_vs_exact" in get(i) else "-" for i in impls]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results, path, device):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  combos = sorted({(r["causal"], r["pass_name"]) for r in results})
  fig, axes = plt.subplots(1, len(combos), figsize=(4.5 * len(combos), 4), squeeze=False)
  for ax, (causal, pass_name) in zip(axes[0], combos):
    for impl in dict.fromkeys(r["impl"] for r in results):
      rows = sorted((r for r in results if r["impl"] == impl and r["causal"] == causal
                     and r["pass_name"] == pass_name), key=lambda r: r["n"])
      if rows:
        label = "exact" if impl in EXACT else f"hyper_attention ({impl})"
        ax.loglog([r["n"] for r in rows], [r["ms"] for r in rows], "o-", label=label)
    ax.set_title(f"{'causal' if causal else 'non-causal'} {pass_name.replace('_', '+')}")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("median time per call (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"B={_BATCH.value}, {_HEADS.value} heads, head_dim {_HEAD_DIM.value}, bf16, "
               f"{device}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  if _PROFILE.value:  # one trace event per op: no CUDA graphs (before the backend starts)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_enable_command_buffer=").strip()
  print(f"jax {jax.__version__}; {jax.devices()[0].device_kind}; "
        f"implementations available: {ha.available_implementations()}", flush=True)
  results = []
  device = jax.devices()[0].device_kind
  if _REPORT.value:
    for path in _REPORT.value:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
      results += data["results"]
      device = data["device"]
  else:
    points = [(int(n), c.lower() == "true") for n in _LENGTHS.value for c in _CAUSAL.value]
    with tqdm(total=len(points) * len(_IMPLS.value) * len(_PASSES.value), unit="point",
              desc="timing") as progress:
      for n, causal in points:
        measure_point(n, causal, results, progress)
  print("\n" + table(results), flush=True)
  if _OUT_DIR.value:
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUT_DIR.value, "results.json"), "w", encoding="utf-8") as f:
      json.dump(dict(device=device, jax=jax.__version__, results=results), f, indent=1)
    with open(os.path.join(_OUT_DIR.value, "table.md"), "w", encoding="utf-8") as f:
      f.write(table(results) + "\n")
    plot(results, os.path.join(_OUT_DIR.value, "plot.png"), device)


if __name__ == "__main__":
  app.run(main)
