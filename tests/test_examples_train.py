"""The training example runs end to end on the CPU at tiny settings."""

import json
import math
import os
import tempfile

from absl.testing import absltest
import numpy as np

from example_run import run_example

# One layer, short context, still on the approximate path (256 > min_seq_len = 128).
TINY_FLAGS = ("--seq_len=256", "--min_seq_len=128", "--block_size=32", "--sample_size=32",
              "--num_layers=1", "--model_dim=32", "--num_heads=2", "--mlp_dim=64",
              "--batch_size=2", "--steps=3", "--warmup_steps=1", "--learning_rate=3e-3",
              "--eval_every=3", "--eval_batches=1")


def generated_text(num_sentences: int = 400, seed: int = 0) -> str:
  """Sentences of random words: enough structure for the loss to drop."""
  rng = np.random.default_rng(seed)
  words = ["the", "a", "letter", "walk", "house", "visit", "sister", "evening", "ball",
           "Mr.", "Mrs.", "Miss", "Darcy", "Emma", "Anne", "was", "had", "said", "very",
           "much", "would", "not", "could", "be", "of", "and", "to", "in", "her", "his"]
  sentences = (" ".join(rng.choice(words, rng.integers(4, 14))).capitalize() + "."
               for _ in range(num_sentences))
  return "\n".join(sentences)


class TrainExampleTest(absltest.TestCase):

  def test_tiny_run(self):
    with tempfile.TemporaryDirectory() as tmp:
      text_file = os.path.join(tmp, "text.txt")
      with open(text_file, "w", encoding="utf-8") as f:
        f.write(generated_text())
      output_dir = os.path.join(tmp, "out")
      result = run_example("train_lm.py", f"--text_file={text_file}",
                           f"--output_dir={output_dir}", *TINY_FLAGS)
      self.assertEqual(result.returncode, 0, msg=result.stderr[-3000:])
      self.assertIn("final validation perplexity", result.stdout)
      with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
      self.assertGreater(os.path.getsize(os.path.join(output_dir, "train_lm.png")), 1000)

    evaluations = metrics["evaluations"]
    self.assertEqual([e["step"] for e in evaluations], [0, 3])
    for record in evaluations:
      for name in ("hyper", "exact"):
        self.assertTrue(math.isfinite(record[name]) and record[name] > 1.0, msg=record)
    # Same initial weights (a zero read-out: perplexity 256), same batches: the two models
    # start together ...
    for name in ("hyper", "exact"):
      self.assertAlmostEqual(evaluations[0][name], 256.0, delta=0.01)
    second = metrics["train_losses"][1]
    self.assertAlmostEqual(second["hyper"], second["exact"], delta=0.05 * second["exact"])
    # ... and both learn.
    for name in ("hyper", "exact"):
      self.assertLess(evaluations[-1][name], evaluations[0][name])
    self.assertEqual(metrics["flags"]["seq_len"], 256)


if __name__ == "__main__":
  absltest.main()
