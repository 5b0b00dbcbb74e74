"""The speed benchmark runs end to end on the CPU and its --report mode rebuilds the table."""

import json
import os
import tempfile

from absl.testing import absltest

from example_run import run_script

BENCH = os.path.join("benchmarks", "bench_mosaic_gpu.py")


class BenchmarkTest(absltest.TestCase):

  def test_tiny_sweep_and_report(self):
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    out, merged = os.path.join(tmp.name, "sweep"), os.path.join(tmp.name, "report")
    result = run_script(BENCH, "--lengths=640", "--heads=2", "--kv_heads=1",
                        "--head_dim=32", "--causal=false,true", "--implementations=auto,exact",
                        "--reps=2", "--max_seconds=0.1", f"--out_dir={out}")
    self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
      rows = json.load(f)["results"]
    # 2 causal settings x 2 implementations x 2 passes, every one timed.
    self.assertLen(rows, 8)
    self.assertTrue(all(row["ms"] > 0 and row["sync_ms"] > 0 for row in rows), msg=rows)
    # Below min_seq_len hyper_attention is exact attention: its error against exact is ~0.
    errors = [row["rel_error_vs_exact"] for row in rows
              if row["impl"] == "auto" and row["pass_name"] == "fwd"]
    self.assertLen(errors, 2)
    self.assertLess(max(errors), 1e-5)
    with open(os.path.join(out, "table.md"), encoding="utf-8") as f:
      table = f.read()
    self.assertIn("| 640 | True | fwd_bwd |", table)
    self.assertGreater(os.path.getsize(os.path.join(out, "plot.png")), 1000)

    report = run_script(BENCH, f"--report={os.path.join(out, 'results.json')}",
                        f"--out_dir={merged}")
    self.assertEqual(report.returncode, 0, msg=report.stderr[-3000:])
    with open(os.path.join(merged, "table.md"), encoding="utf-8") as f:
      self.assertEqual(f.read(), table)


if __name__ == "__main__":
  absltest.main()
