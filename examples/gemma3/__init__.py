"""Gemma 3 270M in JAX, loaded from its GGUF, with pluggable attention on every layer.

``load_checkpoint()`` returns the configuration, the dequantised parameters and the
tokenizer; ``token_nll`` scores a token window under any per-layer choice of attention
(``layer_attention``), so the global layers can run ``hyper_attention``.

Like the other examples, this package imports from the ``examples/`` folder: run scripts as
``python3 examples/NAME.py`` (tests put the folder on ``sys.path``).
"""

from gemma3.model import (ExactCausalAttention, Gemma3Config, HyperCausalAttention,
                          SlidingWindowAttention, forward, greedy_generate, hidden_states,
                          layer_attention, next_token_nll, perplexity,
                          sliding_window_attention, token_nll)
from gemma3.tokenizer import Tokenizer
from gemma3.weights import Checkpoint, default_gguf_path, load_checkpoint

__all__ = [
    "Checkpoint",
    "ExactCausalAttention",
    "Gemma3Config",
    "HyperCausalAttention",
    "SlidingWindowAttention",
    "Tokenizer",
    "default_gguf_path",
    "forward",
    "greedy_generate",
    "hidden_states",
    "layer_attention",
    "load_checkpoint",
    "next_token_nll",
    "perplexity",
    "sliding_window_attention",
    "token_nll",
]
