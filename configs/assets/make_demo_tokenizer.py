"""Regenerates `demo_tokenizer.model`: a 768-piece SentencePiece BPE model of the synthetic world's dialogues.

Run from the repository root: python configs/assets/make_demo_tokenizer.py
Deterministic (one training thread, fixed scenes), so the committed file can be checked by regenerating it.
"""
from pathlib import Path

from sphinx_jax.data import conversation, shapes
from sphinx_jax.data.tokenizer import Tokenizer

VOCAB = 768


def corpus() -> list[str]:
  world = shapes.World(seed=0)
  lines = []
  for i in range(150):
    for task in shapes.WORLD_TASKS:
      _, record, _ = world.sample(i, task)
      lines.append(conversation.render(conversation.turns_of(record.conversations))[0])  # as trained
  return lines


def build() -> bytes:
  """The serialized demo tokenizer."""
  # Every character gets a piece: digits and punctuation fill most of this corpus, so the default coverage
  # (0.98) left 'y', 'x', 'P' and '?' to byte fallback and split "yellow" into three pieces.
  return Tokenizer.train(corpus(), VOCAB, character_coverage=1.0).model_proto


if __name__ == "__main__":
  out = Path(__file__).with_name("demo_tokenizer.model")
  out.write_bytes(build())
  print(f"wrote {out}")
