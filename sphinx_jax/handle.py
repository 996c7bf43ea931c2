"""`sphinx_jax.load(path)`: a model directory (checkpoint.py) -> a ready `Sphinx` handle.

The handle holds `.params` (the parameter pytree), `.config` (the resolved config), `.tokenizer_path` and
`.tokenizer` (data/tokenizer.py `Tokenizer`, None when the directory has no tokenizer.model), and scores text:
`.logits(tokens int[B, 1+T], images=None) -> float32[B, 1+T, V]`, logits[:, t] predicting token t+1, through
models/sphinx.py `Sphinx` (the image block, when given, sits between BOS and the text and is dropped from the
output). `images`: float[B, S, S, 3] CLIP-normalised or uint8[B, S, S, 3] pixels, S = config.model.image_size.
One jitted function serves every call (XLA compiles once per input shape).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sphinx_jax import checkpoint
from sphinx_jax.data.tokenizer import Tokenizer
from sphinx_jax.errors import SphinxError
from sphinx_jax.models import sphinx as sphinx_model

MODEL_PARTS = ("llm", "towers", "fusion")  # other top-level keys (accessory `extras`) are kept for export only


class Sphinx:
  """A loaded model: parameters, config, tokenizer, and scoring."""

  def __init__(self, params, config, tokenizer_path=None, source: str = "<memory>"):
    self.params = params
    self.config = config
    self.source = source
    self.tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path)
    self.tokenizer = None if tokenizer_path is None else Tokenizer.from_file(tokenizer_path)
    model = sphinx_model.Sphinx(config.model)

    def logits(params, tokens, images):
      return model.apply({"params": params}, tokens, images).astype(jnp.float32)

    self._logits = jax.jit(logits)

  def _check_tokens(self, tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    vocab = self.config.model.llm.vocab_size
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise SphinxError(f"logits: tokens must be int[B, T], got {tokens.dtype}{list(tokens.shape)}; "
                        "wrap a single sequence as [ids].")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
      raise SphinxError(f"logits: token ids must lie in [0, {vocab}), got [{tokens.min()}, {tokens.max()}].")
    return tokens.astype(np.int32)

  def _check_images(self, images, batch: int) -> np.ndarray:
    if not self.config.model.towers:
      raise SphinxError(f"{self.source}: this checkpoint has no vision towers; call logits(tokens) without images.")
    images = np.asarray(images)
    side = self.config.model.image_size
    if images.shape != (batch, side, side, 3) or not (images.dtype == np.uint8 or
                                                       np.issubdtype(images.dtype, np.floating)):
      raise SphinxError(f"logits: images must be uint8 or float [{batch}, {side}, {side}, 3] (one per token row, "
                        f"this model's image_size), got {images.dtype}{list(images.shape)}.")
    return images

  def logits(self, tokens, images=None) -> np.ndarray:
    """Next-token logits for int[B, T] tokens (starting with BOS): float32[B, T, V], row t predicting t+1."""
    tokens = self._check_tokens(tokens)
    if images is not None:
      images = self._check_images(images, tokens.shape[0])
    params = {k: v for k, v in self.params.items() if k in MODEL_PARTS}
    return np.asarray(self._logits(params, tokens, images))


def load(path, shardings=None) -> Sphinx:
  """Loads a model directory; `shardings` (a pytree of Shardings like the params) restores onto a mesh,
  otherwise the parameters go to the default device."""
  params, config, tokenizer = checkpoint.load_model_dir(path, shardings)
  if shardings is None:
    params = jax.device_put(params)
  return Sphinx(params, config, tokenizer, source=str(path))
