"""Tokenizer wrapper: the original's encode/encode_segment/decode semantics on the real Mistral v1 model and on
tiny trained models of both segment styles; pickling without the source file; bad files; the committed demo
tokenizer is what its script makes, with a piece for every character of its corpus."""
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

from configs.assets import make_demo_tokenizer
from fixtures_text import mistral_v1_path, train_spm
from sphinx_jax.data.tokenizer import Tokenizer
from sphinx_jax.errors import SphinxError


@pytest.fixture(scope="module")
def mistral():
  return Tokenizer.from_file(mistral_v1_path())


def test_mistral_ids_and_specials(mistral):
  sp = spm.SentencePieceProcessor(model_file=mistral_v1_path())
  assert (mistral.bos_id, mistral.eos_id, mistral.n_words) == (1, 2, 32000)
  text = "### Human: How many circles are there?\n### Assistant: 3\n###"
  assert mistral.encode(text, bos=True, eos=True) == [1] + sp.encode(text) + [2]
  assert mistral.encode(text, bos=False, eos=False) == sp.encode(text)
  # the dummy prefix: a leading "▁" piece on the first word, as LLaMA-style models do
  assert mistral.id_to_piece(mistral.encode("Hello", bos=False, eos=False)[0]).startswith("\u2581")
  assert mistral.decode(mistral.encode(text, bos=True, eos=True)) == text


def test_segment_style_llama_like(mistral):
  assert mistral.need_space_before_segment is False
  whole = mistral.encode("The answer is red.\n###", bos=False, eos=False)
  # leading spaces are dropped, and the segment ids are the tail of the same text in context
  assert mistral.encode_segment("  red.\n###") == mistral.encode("red.\n###", bos=False, eos=False)
  assert whole[-len(mistral.encode_segment("red.\n###")):] == mistral.encode_segment("red.\n###")


def test_segment_style_without_dummy_prefix():
  tok = Tokenizer(train_spm(add_dummy_prefix=False))
  assert tok.need_space_before_segment is True
  sp = spm.SentencePieceProcessor(model_proto=train_spm(add_dummy_prefix=False))
  assert tok.encode_segment("my darling") == sp.encode(" my darling")
  assert sp.encode("Hi my darling")[-len(tok.encode_segment("my darling")):] == tok.encode_segment("my darling")


def test_pickles_without_the_file(tmp_path, mistral):
  path = tmp_path / "tokenizer.model"
  shutil.copy(mistral_v1_path(), path)
  tok = Tokenizer.from_file(path)
  os.remove(path)
  clone = pickle.loads(pickle.dumps(tok))
  text = "Please provide the bounding box coordinate of the region this sentence describes: red circle."
  assert clone.encode(text, bos=True, eos=False) == mistral.encode(text, bos=True, eos=False)
  assert clone.model_proto == tok.model_proto and clone.source == str(path)


def _encode_in_worker(tok, text):
  return tok.encode(text, bos=True, eos=True)


def test_works_in_a_spawned_worker(tmp_path):
  """What Grain worker processes do: receive the pickled tokenizer in a fresh interpreter."""
  path = tmp_path / "tokenizer.model"
  path.write_bytes(train_spm())
  tok = Tokenizer.from_file(path)
  os.remove(path)
  text = "### Assistant: [0.26,0.23,0.52,0.82]\n###"
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    assert pool.apply(_encode_in_worker, (tok, text)) == tok.encode(text, bos=True, eos=True)


def test_bad_files(tmp_path):
  with pytest.raises(SphinxError, match="not found"):
    Tokenizer.from_file(tmp_path / "missing.model")
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"this is not a sentencepiece model")
  with pytest.raises(SphinxError, match="junk.model: not a SentencePiece model"):
    Tokenizer.from_file(junk)


def test_committed_demo_tokenizer_is_regenerated_and_needs_no_byte_fallback():
  committed = Path(make_demo_tokenizer.__file__).with_name("demo_tokenizer.model").read_bytes()
  assert make_demo_tokenizer.build() == committed
  sp = spm.SentencePieceProcessor(model_proto=committed)
  pieces = [p for line in make_demo_tokenizer.corpus() for p in sp.encode(line, out_type=str)]
  assert not [p for p in pieces if p.startswith("<0x")]
