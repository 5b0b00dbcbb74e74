"""Runs an example script the way a user would, on the CPU, for the example tests."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str, *flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """``python3 examples/<name> <flags>`` with the checkout importable; never raises on failure."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, "examples", name), *flags], env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)
