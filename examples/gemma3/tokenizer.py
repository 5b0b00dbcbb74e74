"""The Gemma 3 tokenizer, rebuilt as a SentencePiece model from GGUF metadata.

The GGUF keeps the vocabulary as three arrays (``tokenizer.ggml.tokens``, ``.scores``,
``.token_type``); the original is a SentencePiece BPE model with byte fallback, no
normalisation and no dummy prefix. Two details matter when turning the arrays back into a
``ModelProto``:

* The user-defined whitespace pieces (runs of 2 to 31 spaces, used for code indentation)
  are stored with real spaces in the GGUF. SentencePiece matches pieces after escaping
  spaces to '▁', so they must be written with '▁', or no indentation run ever matches and
  each space becomes its own token.
* The GGUF marks ``<unk>`` as a control token; SentencePiece needs exactly one piece of
  type UNKNOWN, so the unknown id gets that type back.

GGUF token types use SentencePiece's numbering (1 normal, 2 unknown, 3 control,
4 user-defined, 5 unused, 6 byte), so the other types carry over unchanged.
"""

_SPACE_ESCAPE = "\u2581"  # '▁', SentencePiece's escaped space
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


def _sp_model_pb2():
  # Imported lazily: the protobuf module is only needed to build the model once.
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  return sentencepiece_model_pb2


def model_proto_from_vocab(tokens, scores, token_types, *, unk_id: int, bos_id: int,
                           eos_id: int, pad_id: int, add_space_prefix: bool = False) -> bytes:
  """A serialized SentencePiece BPE ``ModelProto`` for a GGUF vocabulary.

  Args:
    tokens: ``[vocab]`` piece strings as stored in the GGUF.
    scores: ``[vocab]`` piece scores (BPE merge priority).
    token_types: ``[vocab]`` GGUF token types.
    unk_id, bos_id, eos_id, pad_id: special token ids.
    add_space_prefix: SentencePiece's ``add_dummy_prefix``.

  Returns:
    The serialized model, loadable with ``sentencepiece.SentencePieceProcessor``.
  """
  pb2 = _sp_model_pb2()
  proto = pb2.ModelProto()
  trainer = proto.trainer_spec
  trainer.model_type = pb2.TrainerSpec.BPE
  trainer.vocab_size = len(tokens)
  trainer.byte_fallback = True
  # SentencePiece finds its special tokens by piece, so both the ids and the pieces are set.
  for name, token_id in (("unk", unk_id), ("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
    setattr(trainer, f"{name}_id", token_id)
    if token_id >= 0:
      setattr(trainer, f"{name}_piece", tokens[token_id])
  normalizer = proto.normalizer_spec
  normalizer.name = "identity"
  normalizer.add_dummy_prefix = add_space_prefix
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True
  for i, (piece, score, kind) in enumerate(zip(tokens, scores, token_types)):
    kind = int(kind)
    if i == unk_id:
      kind = _UNKNOWN
    elif kind == _USER_DEFINED:
      piece = piece.replace(" ", _SPACE_ESCAPE)
    entry = proto.pieces.add()
    entry.piece = piece
    entry.score = float(score)
    entry.type = kind
  return proto.SerializeToString()


def vocab_from_gguf(reader) -> dict:
  """The tokenizer metadata of a ``gguf.GGUFReader``: ``model_proto_from_vocab``'s arguments.

  Plain Python values (JSON-serialisable), so they can be cached beside the weights.
  """
  def value(key, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()

  model = value("tokenizer.ggml.model")
  if model != "llama":
    raise ValueError(f"expected a SentencePiece ('llama') tokenizer; "
                     f"tokenizer.ggml.model={model!r}.")
  return {
      "tokens": list(value("tokenizer.ggml.tokens")),
      "scores": [float(x) for x in value("tokenizer.ggml.scores")],
      "token_types": [int(x) for x in value("tokenizer.ggml.token_type")],
      "unk_id": int(value("tokenizer.ggml.unknown_token_id")),
      "bos_id": int(value("tokenizer.ggml.bos_token_id")),
      "eos_id": int(value("tokenizer.ggml.eos_token_id")),
      "pad_id": int(value("tokenizer.ggml.padding_token_id", -1)),
      "add_space_prefix": bool(value("tokenizer.ggml.add_space_prefix", False)),
  }


class Tokenizer:
  """Text <-> token ids with the GGUF's vocabulary.

  Args:
    model_proto: a serialized SentencePiece model (``model_proto_from_vocab``).
  """

  def __init__(self, model_proto: bytes):
    import sentencepiece  # pylint: disable=import-outside-toplevel
    self.model_proto = model_proto
    self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
    """Token ids of ``text``, optionally after the BOS token."""
    return self._sp.encode(text, add_bos=add_bos)

  def decode(self, ids) -> str:
    """The text of ``ids`` (control tokens such as BOS decode to nothing)."""
    return self._sp.decode([int(i) for i in ids])

  def pieces(self, ids) -> list[str]:
    """The vocabulary piece of each id, for inspection."""
    return [self._sp.id_to_piece(int(i)) for i in ids]
