"""The attention-swapping example runs and reproduces Flax's output on short inputs."""

import re

from absl.testing import absltest

from example_run import run_example


class SwapExampleTest(absltest.TestCase):

  def test_tiny_run(self):
    result = run_example("swap_flax_attention.py", "--short_len=64", "--long_len=256",
                         "--min_seq_len=128", "--block_size=32", "--sample_size=32",
                         "--model_dim=32", "--num_heads=2", "--num_layers=1")
    self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
    exact_part = result.stdout.split("length 256")[0]
    differences = [float(x) for x in re.findall(r"^  .*? (\S+)$", exact_part, re.MULTILINE)]
    self.assertLen(differences, 4)
    self.assertLess(max(differences), 1e-5)
    self.assertIn("approximate path", result.stdout)


if __name__ == "__main__":
  absltest.main()
