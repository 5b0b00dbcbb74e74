"""Runs an example or benchmark script the way a user would, on the CPU, for the tests."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(path: str, *flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """``python3 <path> <flags>`` (``path`` from the repository root) with the checkout importable,
  on the CPU; never raises on failure."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(REPO, path), *flags], env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def run_example(name: str, *flags: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """``python3 examples/<name> <flags>``, as :func:`run_script` runs it."""
  return run_script(os.path.join("examples", name), *flags, timeout=timeout)
