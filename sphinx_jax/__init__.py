"""sphinx_jax: SPHINX (Alpha-VLLM LLaMA2-Accessory's multimodal LLM) in JAX/Flax.

`sphinx_jax.load(path)` returns a model handle for an Orbax checkpoint directory written by
`sphinx-jax train`, `convert` or `mix` (DESIGN.md "Contracts").
"""
from sphinx_jax.errors import SphinxError

__version__ = "0.1.0"


def load(path, **kwargs):
  """Loads an Orbax checkpoint directory (params, model config, tokenizer) into a ready handle."""
  from sphinx_jax.handle import load as _load
  return _load(path, **kwargs)


__all__ = ["SphinxError", "load", "__version__"]
