"""Wall-clock timing helpers shared by the benchmark scripts."""

import collections
import glob
import re
import shutil
import statistics
import time

import jax


def median_ms(fn, *args, reps: int = 10, warmup: int = 2, max_seconds: float = 20.0,
              queued: int = 1):
  """Median wall time of ``fn(*args)`` in milliseconds, after ``warmup`` calls.

  Each sample dispatches ``queued`` calls back to back and waits for the last
  (``block_until_ready``), divided by ``queued``: with 1 it is the latency of one
  synchronised call, host dispatch and synchronisation included; with more it is the
  time per call of a stream of calls, as a training loop runs them. Fewer than ``reps``
  samples are taken when they would take longer than ``max_seconds`` together.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < reps:
    t0 = time.perf_counter()
    for _ in range(queued - 1):
      fn(*args)
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3 / queued)
    if time.perf_counter() - start > max_seconds and len(times) >= 3:
      break
  return statistics.median(times)


def compile_seconds(fn, *args):
  """Seconds to trace, lower and compile a jitted ``fn`` for ``args``; returns the executable."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return time.perf_counter() - t0, compiled


def device_op_ms(fn, *args, reps: int = 2, trace_dir: str = "/tmp/hyperattention_profile"):
  """Device time per call of each XLA op (fusion, custom call) of ``fn(*args)``, in ms.

  ``fn`` is called ``reps`` times under ``jax.profiler.trace``; the device planes of the
  trace (kernels on the accelerator's streams) are summed by the op that launched them.
  Returns ``{op name: ms per call}``, largest first; empty where the backend records no
  device activity (the CPU).
  """
  shutil.rmtree(trace_dir, ignore_errors=True)
  jax.block_until_ready(fn(*args))
  with jax.profiler.trace(trace_dir):
    for _ in range(reps):
      jax.block_until_ready(fn(*args))
  totals = collections.Counter()
  for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      if not plane.name.startswith("/device:"):
        continue
      lines = list(plane.lines)
      streams = [line for line in lines if line.name.startswith("Stream")] or lines
      for line in streams:
        for event in line.events:
          stats = dict(event.stats)
          totals[str(stats.get("hlo_op", event.name))] += event.duration_ns / 1e6 / reps
  return dict(totals.most_common())


def ms_by_scope(op_ms, hlo_text: str, scopes):
  """Sums ``device_op_ms`` results by the outermost of ``scopes`` (``jax.named_scope``
  names) in each op's ``op_name`` metadata in the compiled ``hlo_text``; ops in none of
  them count as "other"."""
  op_names = dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', hlo_text,
                             flags=re.MULTILINE))
  totals = {}
  for op, ms in op_ms.items():
    path = op_names.get(op, "").split("/")
    scope = next((part for part in path if part in scopes), "other")
    totals[scope] = totals.get(scope, 0.0) + ms
  return totals
