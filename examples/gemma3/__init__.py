"""Gemma 3 270M in JAX, loaded from its GGUF, with pluggable attention on every layer.

``weights.load_checkpoint()`` returns the configuration, the dequantised parameters and the
tokenizer; ``model.token_nll`` scores a token window with any per-layer choice of attention
(``model.layer_attention``), so the global layers can run ``hyper_attention``.
"""

from examples.gemma3.model import (ExactCausalAttention, Gemma3Config, HyperCausalAttention,
                                   SlidingWindowAttention, forward, greedy_generate,
                                   hidden_states, layer_attention, perplexity,
                                   sliding_window_attention, token_nll)
from examples.gemma3.tokenizer import Tokenizer
from examples.gemma3.weights import Checkpoint, default_gguf_path, load_checkpoint

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
    "perplexity",
    "sliding_window_attention",
    "token_nll",
]
