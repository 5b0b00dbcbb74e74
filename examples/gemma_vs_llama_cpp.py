"""Cross-checks the JAX Gemma 3 270M against llama.cpp on the same GGUF and the same tokens.

llama.cpp is an independent implementation of the model and of its tokenizer, so agreement
on token ids and per-token losses shows that the loader, the tokenizer and the forward pass
here follow the checkpoint's conventions. The losses cannot agree exactly: llama.cpp's CPU
kernels quantise the activations to 8 bits for their quantised dot products, while the JAX
model multiplies float32 activations by the dequantised weights.

Needs ``llama-cpp-python`` (not a dependency of the package: ``pip install
llama-cpp-python`` compiles llama.cpp from source, which takes a long time on two cores).
With the library built elsewhere, ``$LLAMA_CPP_LIB_PATH`` names the folder of ``libllama.so``.

  python3 examples/gemma_vs_llama_cpp.py --context=2048
"""

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np

import austen_fetch
import gemma3

_CONTEXT = flags.DEFINE_integer("context", 2048, "Window length n (tokens, BOS included).")
_NOVEL = flags.DEFINE_string("novel", "prideprejudice", "Novel (see austen_fetch.NOVELS).")
_THREADS = flags.DEFINE_integer("threads", 2, "llama.cpp threads.")
_GGUF = flags.DEFINE_string("gguf", None, "The .gguf file (default: the PyPI package's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "janeaustenr data folder (austen_fetch.py).")

TOKENIZER_SAMPLES = (
    "Hello world",
    "def f(x):\n    return x  # four spaces\n\tTabbed\n        eight",
    "  leading spaces, trailing spaces   \n\n\nthree newlines",
    "12345 café 日本語 🙂",
)


def log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  top = logits.max(axis=-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def main(argv):
  del argv
  import llama_cpp  # pylint: disable=import-outside-toplevel
  path = str(_GGUF.value or gemma3.default_gguf_path())
  checkpoint = gemma3.load_checkpoint(path)
  config, tokenizer = checkpoint.config, checkpoint.tokenizer
  n = _CONTEXT.value
  llm = llama_cpp.Llama(model_path=path, n_ctx=max(n, 512), n_batch=512, logits_all=True,
                        n_threads=_THREADS.value, verbose=False)

  def theirs(text, add_bos=False):
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

  for sample in TOKENIZER_SAMPLES:
    same = tokenizer.encode(sample) == theirs(sample)
    print(f"tokens of {sample[:30]!r}: {'same' if same else 'DIFFERENT'}")
  text = austen_fetch.novel_text(_NOVEL.value, data_dir=_DATA_DIR.value)
  ids = tokenizer.encode(text, add_bos=True)[:n]
  print(f"first {n} tokens of {_NOVEL.value}: "
        f"{'same' if ids == theirs(text, add_bos=True)[:n] else 'DIFFERENT'}")

  llm.reset()
  llm.eval(ids)
  ref_logprobs = log_softmax(np.asarray(llm.scores[:n]))
  ref_nll = -ref_logprobs[np.arange(n - 1), ids[1:]]
  tokens = jnp.asarray([ids], jnp.int32)
  attention = gemma3.layer_attention(config)
  nll, _ = gemma3.token_nll(checkpoint.params, tokens, config=config, attention=attention)
  nll = np.asarray(nll[0], np.float64)
  logits, _ = gemma3.forward(checkpoint.params, tokens[:, :128], config=config,
                             attention=attention)
  agree = (np.asarray(logits[0]).argmax(-1) == ref_logprobs[:128].argmax(-1)).mean()

  print(f"perplexity: JAX {np.exp(nll.mean()):.4f}, llama.cpp {np.exp(ref_nll.mean()):.4f}")
  diff = np.abs(nll - ref_nll)
  print(f"per-token loss: correlation {np.corrcoef(nll, ref_nll)[0, 1]:.5f}, mean |diff| "
        f"{diff.mean():.4f} nats, max |diff| {diff.max():.4f}; same argmax at "
        f"{100 * agree:.1f}% of the first 128 positions")
  print(f"{'positions':>15} {'JAX loss':>9} {'llama.cpp':>10}")
  edges = [1] + [e for e in (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384) if e < n - 1]
  for a, b in zip(edges, edges[1:] + [n]):
    print(f"{f'{a}-{b - 1}':>15} {nll[a - 1:b - 1].mean():>9.4f} "
          f"{ref_nll[a - 1:b - 1].mean():>10.4f}")


if __name__ == "__main__":
  app.run(main)
