"""Test-session settings, applied before JAX starts."""

import os


def _add_xla_flags(flags: str):
  """Appends ``flags`` to ``XLA_FLAGS`` unless they are there already."""
  if flags not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


# The suite compiles many small programs on the CPU and runs each briefly: cheaper LLVM
# optimisation cuts compile time by about half and does not change the results' checks.
_add_xla_flags("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

# Pallas' GPU interpreter runs each warpgroup as a thread whose host callbacks may block on
# barriers; XLA's concurrency-optimised CPU scheduler can hand those callbacks to a thread
# pool as small as the core count, where two blocked warpgroups starve the third.
_add_xla_flags("--xla_cpu_enable_concurrency_optimized_scheduler=false")
