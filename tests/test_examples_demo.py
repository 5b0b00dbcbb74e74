"""The quick start's demo runs and reports a time and an error for HyperAttention."""

import re

from absl.testing import absltest

from example_run import run_example


class DemoExampleTest(absltest.TestCase):

  def test_tiny_run(self):
    # Causal, grouped heads, on the approximate path (1024 > min_seq_len = 256).
    result = run_example("demo.py", "--seq_len=1024", "--min_seq_len=256", "--block_size=64",
                         "--sample_size=32", "--heads=4", "--kv_heads=2", "--causal",
                         "--repeats=1")
    self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
    self.assertIn("block_size=64, sample_size=32", result.stdout)
    speed = re.search(r"\(([\d.]+)x faster\)", result.stdout)
    self.assertIsNotNone(speed, msg=result.stdout)
    errors = re.search(r"vs exact: ([\d.]+) over the whole output; per row: median ([\d.]+), "
                       r"90th percentile ([\d.]+)", result.stdout)
    self.assertIsNotNone(errors, msg=result.stdout)
    whole, median, p90 = map(float, errors.groups())
    self.assertTrue(0 < whole < 10 and 0 <= median <= p90, msg=result.stdout)


if __name__ == "__main__":
  absltest.main()
