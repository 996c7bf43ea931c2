"""Builders and checks shared by the checkpoint tests: a tiny trained sentencepiece model, tiny random HF LLaMAs
and `assert_same_tree` (leaf paths, dtypes, shapes and bits of two parameter trees).

Everything is real: sentencepiece's trainer, transformers 4.57 `LlamaForCausalLM` with every weight (norms
included) randomised, saved by `save_pretrained`; files are read back with safetensors' own torch loader,
independently of the project's readers.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from sphinx_jax import checkpoint

VOCAB = 128
WORDS = ("red green blue square circle triangle left right above below small large image box point the a of "
         "and is in on near far what where which how many count").split()


def train_tokenizer(path: Path) -> Path:
  """A LLaMA-style (unk 0, bos 1, eos 2) unigram sentencepiece model with VOCAB pieces, written to `path`."""
  rng = random.Random(0)
  syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
  words = WORDS + ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(200)]
  sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(400)]
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=proto, vocab_size=VOCAB,
                                 model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                 minloglevel=2)
  path.write_bytes(proto.getvalue())
  return path


def tiny_hf_llama(dtype=torch.float32, seed=0) -> LlamaForCausalLM:
  """REFERENCES.md §1a's tiny LLaMA (GQA 4/2 heads, FFN 172, untied head), every weight random."""
  config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = LlamaForCausalLM._from_config(config, attn_implementation="eager")
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
  return model.to(dtype).eval()


def save_hf_dir(model, path: Path, tokenizer: Path | None = None, max_shard_size="5GB") -> Path:
  model.save_pretrained(path, max_shard_size=max_shard_size)
  if tokenizer is not None:
    (path / "tokenizer.model").write_bytes(tokenizer.read_bytes())
  return path


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
  """Every tensor of every *.safetensors file in `path`, via safetensors' torch loader."""
  tensors = {}
  for file in sorted(path.glob("*.safetensors")):
    tensors.update(load_file(file))
  return tensors


def hf_logits(model, tokens) -> torch.Tensor:
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float()


def assert_same_tree(got: dict, want: dict):
  """Same leaf paths, dtypes, shapes and bits."""
  got, want = checkpoint.flatten(got), checkpoint.flatten(want)
  assert sorted(got) == sorted(want)
  for path, leaf in want.items():
    ours = np.asarray(got[path])
    assert ours.dtype == leaf.dtype and ours.shape == leaf.shape, path
    assert ours.tobytes() == np.ascontiguousarray(leaf).tobytes(), path
