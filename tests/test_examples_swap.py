"""The attention-swapping example runs and reproduces Flax's output on short inputs."""

import os
import re
import subprocess
import sys

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "swap_flax_attention.py")


class SwapExampleTest(absltest.TestCase):

  def test_tiny_run(self):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]), JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, EXAMPLE, "--short_len=64", "--long_len=256", "--min_seq_len=128",
         "--block_size=32", "--sample_size=32", "--model_dim=32", "--num_heads=2",
         "--num_layers=1"], env=env, capture_output=True, text=True, timeout=600, check=False)
    self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
    exact_part = result.stdout.split("length 256")[0]
    differences = [float(x) for x in re.findall(r"^  .*? (\S+)$", exact_part, re.MULTILINE)]
    self.assertLen(differences, 4)
    self.assertLess(max(differences), 1e-5)
    self.assertIn("approximate path", result.stdout)


if __name__ == "__main__":
  absltest.main()
