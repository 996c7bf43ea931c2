"""SentencePiece tokenizer with the semantics of LLaMA2-Accessory's `accessory/model/tokenizer.py` (spm branch).

`encode(s, bos, eos)` -> list[int]: optional BOS, `sp.encode(s)` (with sentencepiece's dummy-prefix "▁"),
optional EOS. `encode_segment(s)` -> list[int]: the ids a piece cut out of a longer text gets inside that text
(used to find assistant replies); `decode(ids)` -> str. Padding uses id 0, as the original's data code does.
Only `.model` files are supported: every SPHINX variant ships one (LLaMA-2 or Mistral v1, 32000 pieces).

The object keeps the serialized model proto, not a path, so it pickles into Grain worker processes even when
the file it came from is gone.
"""
from __future__ import annotations

import io
import os

import sentencepiece as spm

from sphinx_jax.errors import SphinxError

PAD_ID = 0


class Tokenizer:
  """A picklable SentencePiece model. Build with `Tokenizer.from_file(path)` or `Tokenizer(proto_bytes)`."""

  def __init__(self, model_proto: bytes, source: str = "<bytes>"):
    self._proto = bytes(model_proto)
    self.source = source
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except (RuntimeError, OSError) as e:
      raise SphinxError(f"{source}: not a SentencePiece model ({e}); pass the tokenizer.model of the "
                        f"checkpoint") from None
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise SphinxError(f"{source}: the SentencePiece model defines no BOS/EOS piece (bos={self.bos_id}, "
                        f"eos={self.eos_id}); SPHINX needs both, use the model's own tokenizer.model")
    self.need_space_before_segment = self._probe_segment_style()

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise SphinxError(f"{path}: tokenizer model not found; point to the checkpoint's tokenizer.model")
    with open(path, "rb") as f:
      return cls(f.read(), source=path)

  @classmethod
  def train(cls, lines, vocab_size: int, *, add_dummy_prefix: bool = True,
            character_coverage: float = 0.98) -> "Tokenizer":
    """A BPE model trained on `lines` with LLaMA's settings (byte fallback, split digits, identity normaliser,
    whitespace kept, unk 0 / bos 1 / eos 2, no pad piece); deterministic (one thread). Used for the demo's
    tokenizer and the tests' tiny models. Characters outside `character_coverage` of the corpus's character
    mass get no piece and fall back to bytes."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=add_dummy_prefix, character_coverage=character_coverage,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return cls(out.getvalue(), source=f"<trained, {vocab_size} pieces>")

  @property
  def n_words(self) -> int:
    return self._sp.vocab_size()

  @property
  def model_proto(self) -> bytes:
    """The serialized model, e.g. to save it next to a checkpoint."""
    return self._proto

  def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
    ids = self._sp.encode(s)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_segment(self, s: str) -> list[int]:
    """Ids of `s` as it appears after other text: leading spaces dropped, one added back only for tokenizers
    that do not imply it (LLaMA-style models imply it through the dummy prefix)."""
    s = s.lstrip(" ")
    return self.encode(" " + s if self.need_space_before_segment else s, bos=False, eos=False)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def _probe_segment_style(self) -> bool:
    # The original probes with this sentence: if "my darling" tokenises the same alone and at the end of
    # "Hi my darling", a segment needs no explicit leading space.
    whole = self.encode("Hi my darling", bos=False, eos=False)
    tail = self.encode("my darling", bos=False, eos=False)
    if whole[-len(tail):] == tail:
      return False
    spaced = self.encode(" my darling", bos=False, eos=False)
    if whole[-len(spaced):] != spaced:
      raise SphinxError(f"{self.source}: cannot tell how this tokenizer splits a segment from its context "
                        f"(neither 'my darling' nor ' my darling' ends 'Hi my darling'); use a LLaMA-style "
                        f"SentencePiece model")
    return True

  def __getstate__(self):
    return {"model_proto": self._proto, "source": self.source}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], state["source"])
