"""Wall-clock timing helpers shared by the benchmark scripts."""

import statistics
import time

import jax


def median_ms(fn, *args, reps: int = 10, warmup: int = 2, max_seconds: float = 20.0):
  """Median wall time of ``fn(*args)`` in milliseconds, after ``warmup`` calls.

  Every call is synchronised (``block_until_ready``); fewer than ``reps`` calls are made
  when they would take longer than ``max_seconds`` together.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < reps:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
    if time.perf_counter() - start > max_seconds and len(times) >= 3:
      break
  return statistics.median(times)


def compile_seconds(fn, *args):
  """Seconds to trace, lower and compile a jitted ``fn`` for ``args``; returns the executable."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return time.perf_counter() - t0, compiled
