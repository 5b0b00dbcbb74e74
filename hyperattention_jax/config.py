"""Configuration of HyperAttention."""

import dataclasses

# Sort keys are int32 and padding rows sort after every bucket, under the key 2**num_projections.
MAX_NUM_PROJECTIONS = 30


def check_int(name, value, minimum, maximum=None):
  """Raises ValueError unless ``value`` is an int in [minimum, maximum]."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{name}={value!r} must be an int.")
  if value < minimum or (maximum is not None and value > maximum):
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ValueError(f"{name}={value!r} must be {bound}.")


@dataclasses.dataclass(frozen=True)
class HyperAttentionConfig:
  """Hyper-parameters of HyperAttention.

  Frozen and hashable, so it can be a static argument of ``jax.jit``.

  Attributes:
    block_size: keys per diagonal block of the LSH-sorted order (``b`` in the paper).
    sample_size: uniformly sampled key columns per (head, piece) for the residual
      estimate (``m``); 0 turns the sampled residual off.
    num_projections: random hyperplanes of the angular LSH (``r``); 2**r buckets.
    min_seq_len: query lengths up to this are computed exactly; in causal attention it
      bounds the length of the exact leaves of the recursion.
    sink_size: the first ``sink_size`` key positions are attended exactly by every
      query ("attention sinks").
    window_size: keys within this distance of the query are attended exactly
      (``i - window_size < j <= i`` when causal, ``|i - j| < window_size`` otherwise).
      Self-attention only.
  """

  block_size: int = 256
  sample_size: int = 256
  num_projections: int = 7
  min_seq_len: int = 4096
  sink_size: int = 4
  window_size: int = 0

  def __post_init__(self):
    check_int("block_size", self.block_size, 1)
    check_int("sample_size", self.sample_size, 0)
    check_int("num_projections", self.num_projections, 1, MAX_NUM_PROJECTIONS)
    check_int("min_seq_len", self.min_seq_len, 1)
    check_int("sink_size", self.sink_size, 0)
    check_int("window_size", self.window_size, 0)

  def replace(self, **changes) -> "HyperAttentionConfig":
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  @property
  def has_local(self) -> bool:
    """Whether some keys (sinks or a window) are attended exactly beside the LSH part."""
    return self.sink_size > 0 or self.window_size > 0


# Named configurations. The default above is the paper's algorithm plus four exact sink keys:
# its residual estimate is unbiased, which suits models trained with HyperAttention.

PAPER_CONFIG = HyperAttentionConfig(sink_size=0)
"""The paper's algorithm: LSH blocks, uniformly sampled columns, no exact sinks or window."""

PRETRAINED_LM_CONFIG = HyperAttentionConfig(block_size=512, sample_size=0, min_seq_len=8192,
                                            sink_size=4, window_size=2048)
"""For the global layers of a pretrained LLM trained with exact attention.

Such models put much of their attention on the first token and on recent tokens: this
preset attends exactly to the first 4 keys, a window of 2048 and causal leaves of 8192, and
to blocks of 512 LSH-sorted keys; it leaves the sampled residual out, whose variance at a few
hundred samples costs these models more than its bias removal gains. Measured on Gemma 3
270M at 32k context (all three global layers replaced; six Jane Austen windows; H200, bf16):
perplexity 1.016x exact attention's (the paper's configuration: 1.29x; the default: 1.09x)
with the global layers' attention at 0.66x exact attention's time (cuDNN), and 0.15x at 131k
(benchmarks/RESULTS.md). Its approximation is biased: keys outside the exact sets and the
query's LSH block get no weight.
"""

PRESETS = {"default": HyperAttentionConfig(), "paper": PAPER_CONFIG,
           "pretrained_lm": PRETRAINED_LM_CONFIG}
"""The named configurations by name, as the examples' and benchmarks' ``--preset`` flags
take them."""
