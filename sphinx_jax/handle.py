"""`sphinx_jax.load(path)`: a model directory (checkpoint.py) -> a ready `Sphinx` handle.

The handle holds `.params` (the parameter pytree), `.config` (the resolved config), `.tokenizer_path` and
`.tokenizer` (data/tokenizer.py `Tokenizer`, None when the directory has no tokenizer.model), and scores text:
`.logits(tokens int[B, 1+T], images=None) -> float32[B, 1+T, V]`, logits[:, t] predicting token t+1, through
models/sphinx.py `Sphinx` (the image block, when given, sits between BOS and the text and is dropped from the
output). `images`: float[B, S, S, 3] CLIP-normalised or uint8[B, S, S, 3] pixels, S = config.model.image_size.
One jitted function serves every call (XLA compiles once per input shape).

Layout: the handle holds ONE copy of the decoder, unscanned ('llm/layers_0/...'), the layout inference runs
(inference/generate.py `decoding_config`: a scanned decode step slices every layer's weights and KV cache out
of the stacked arrays). A scanned checkpoint is split at load time, and `.config.model.llm.scan_layers` is
False, so `.params` and `.config` always describe each other; scoring, chat, `generate`, the CLIs and
`sphinx-jax eval` all run that one tree.

Chat and generation (inference/generate.py, SPHINX.md §9): `.chat(image, question, history=[(q, a), ...],
**sampling) -> str` renders the conversation template and returns the reply (what the original's
`generate_response` does); `.generate(images, prompts, **sampling) -> list[str]` runs a batch of raw prompts.
`image` is a path, bytes, a PIL image, uint8[H, W, 3] pixels (padded-resized here like the original) or None;
sampling: max_new_tokens, temperature (0 = greedy), top_p, seed — the original's defaults below.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sphinx_jax import checkpoint
from sphinx_jax.data import conversation, image as image_data
from sphinx_jax.data.tokenizer import Tokenizer
from sphinx_jax.errors import SphinxError
from sphinx_jax.inference.generate import Generator, decode_params, decoding_config
from sphinx_jax.models import sphinx as sphinx_model
from sphinx_jax.models.llama import unstack_layers

MODEL_PARTS = ("llm", "towers", "fusion")  # other top-level keys (accessory `extras`) are kept for export only
CHAT_DEFAULTS = dict(max_new_tokens=512, temperature=0.1, top_p=0.5, seed=0)  # `generate_response` defaults


class Sphinx:
  """A loaded model: parameters, config, tokenizer, and scoring."""

  def __init__(self, params, config, tokenizer_path=None, source: str = "<memory>"):
    """`params` in either decoder layout (scanned ones are unstacked, a copy; `load` splits them in place)."""
    config = config.copy_and_resolve_references()
    config.model = decoding_config(config.model)
    model = sphinx_model.Sphinx(config.model)
    self.params = decode_params(model, params)
    self.config = config
    self.source = source
    self.tokenizer_path = None if tokenizer_path is None else Path(tokenizer_path)
    self.tokenizer = None if tokenizer_path is None else Tokenizer.from_file(tokenizer_path)

    def logits(params, tokens, images):
      return model.apply({"params": params}, tokens, images).astype(jnp.float32)

    self._logits = jax.jit(logits)
    self._model = model
    self._generator = None

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


  @property
  def generator(self):
    """The inference/generate.py Generator over the handle's (unscanned) params, built once; its programs
    compile per bucket."""
    if self.tokenizer is None:
      raise SphinxError(f"{self.source}: no tokenizer.model in this checkpoint; generation needs one "
                        "(convert or mix from a directory that has it).")
    if self._generator is None:
      params = {k: v for k, v in self.params.items() if k in MODEL_PARTS}
      self._generator = Generator(self._model, params, self.tokenizer)  # same arrays: no second copy
    return self._generator

  def pixels(self, image) -> np.ndarray:
    """Any image (path, bytes, PIL, uint8[H, W, 3]) -> uint8[S, S, 3] padded-resized like the original."""
    if isinstance(image, np.ndarray):
      from PIL import Image
      image = Image.fromarray(image.astype(np.uint8))
    if not isinstance(image, (str, bytes, Path)):
      return image_data.padded_resize(image.convert("RGB"), self.config.model.image_size)
    return image_data.load_padded(str(image) if isinstance(image, Path) else image, self.config.model.image_size)

  def generate(self, images, prompts, **sampling) -> list[str]:
    """Replies to raw prompts (already in the template), one image (or None) per prompt."""
    sampling = {**CHAT_DEFAULTS, **sampling}
    if images is None or all(i is None for i in images):
      return self.generator.generate(list(prompts), **sampling)
    if not self.config.model.towers:
      raise SphinxError(f"{self.source}: this checkpoint has no vision towers; pass images=None.")
    side = self.config.model.image_size
    pixels = np.stack([np.zeros((side, side, 3), np.uint8) if i is None else self.pixels(i) for i in images])
    has_image = np.array([i is not None for i in images])
    return self.generator.generate(list(prompts), pixels, has_image, **sampling)

  def chat(self, image, question: str, history=(), **sampling) -> str:
    """One reply of the SPHINX chat template to `question` after `history` [(question, answer), ...]."""
    prompt = conversation.render_prompt(list(history), question)
    return self.generate(None if image is None else [image], [prompt], **sampling)[0]


def load(path, shardings=None) -> Sphinx:
  """Loads a model directory; `shardings` (a pytree of Shardings like the params) restores onto a mesh,
  otherwise the parameters go to the default device."""
  params, config, tokenizer = checkpoint.load_model_dir(path, shardings)
  llm = config.model.llm
  if llm.scan_layers:  # host arrays split into views; restored device arrays leaf by leaf, freeing the stack
    params = dict(params, llm=unstack_layers(params["llm"], llm.n_layers, consume=True))
  if shardings is None:
    params = jax.device_put(params)
  return Sphinx(params, config, tokenizer, source=str(path))
