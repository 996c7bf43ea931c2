"""Shared text fixtures: the real Mistral v1 SentencePiece model and tiny models trained here.

`mistral_v1_path()`: the 32000-piece `tokenizer.model.v1` shipped in the mistral-common wheel (installed
--no-deps from requirements-nodeps.txt). `train_spm(...)`: a small BPE model with byte fallback, LLaMA's
normaliser settings (identity, whitespace kept, split digits), trained in memory on `corpus()`: rendered
conversations of the synthetic world plus generated sentences. Both are cached per process.
"""
import functools
import importlib.resources
from sphinx_jax.data import shapes
from sphinx_jax.data.tokenizer import Tokenizer


def mistral_v1_path() -> str:
  path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: install mistral-common==1.13.1 --no-deps (requirements-nodeps.txt)")
  return str(path)


def corpus() -> list[str]:
  """A few hundred sentences in the project's domain: world dialogues and templated chat text."""
  world = shapes.World(seed=123)
  lines = []
  for i in range(40):
    for task in shapes.WORLD_TASKS:
      _, record, _ = world.sample(i, task)
      lines += [t["value"] for t in record.conversations]
  subjects = ["The assistant", "A curious human", "The red circle", "My darling", "The answer"]
  verbs = ["gives", "describes", "asks about", "points to", "is left of"]
  objects = ["helpful answers", "the blue square", "my darling", "the image", "my questions"]
  lines += [f"{s} {v} {o}." for s in subjects for v in verbs for o in objects]
  lines += ["A chat between a curious human and an artificial intelligence assistant.", "### Human: Hi",
            "### Assistant: Hello", "Hi my darling", "The answer is A."]
  return lines


@functools.lru_cache(maxsize=None)
def train_spm(vocab_size: int = 384, add_dummy_prefix: bool = True) -> bytes:
  """Serialized SentencePiece BPE model trained on corpus() (about a second)."""
  return Tokenizer.train(corpus(), vocab_size, add_dummy_prefix=add_dummy_prefix).model_proto
