"""The assembled SPHINX against the composed PyTorch reference of `torch_sphinx.py` (real reference towers + a
LLaMA from SPHINX.md §2.1). Every weight is random (norms, LayerScale gammas, class/position/query tokens, image
tags included); the state dict is written as a LLaMA2-Accessory checkpoint directory and read back through
`convert/accessory.py` (which calls the tower converters), as a user's checkpoint would be.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoint_helpers import train_tokenizer
from configs import sphinx as presets
from sphinx_jax.config import image_tokens
from sphinx_jax.convert.accessory import import_accessory
from sphinx_jax.data import image as image_data
from sphinx_jax.data.tokenizer import Tokenizer
from sphinx_jax.errors import SphinxError
from sphinx_jax.inference.generate import Generator
from sphinx_jax.models import sphinx as sphinx_model
from torch_sphinx import TorchSphinx, accessory_dir, photo, randomise, torch_image

torch.set_grad_enabled(False)
VOCAB = 128  # checkpoint_helpers.train_tokenizer's size; the decoder's vocab comes from tok_embeddings


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
  return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module", params=["tiny_sphinx", "tiny_sphinx_1k", "tiny_sphinx_tiny"])
def pair(request, tmp_path_factory, tokenizer_file):
  """(torch reference, our model, our params, tokenizer path, image NHWC) for one tiny variant."""
  model = presets.get_config(request.param).model
  model.llm.vocab_size = VOCAB
  torch.manual_seed(0)
  reference = TorchSphinx(model).eval()
  randomise(reference, seed=1)
  directory = accessory_dir(reference, model, tmp_path_factory.mktemp(request.param), tokenizer_file)
  params, config, tokenizer = import_accessory(directory, progress=False)
  params = {k: params[k] for k in ("llm", "towers", "fusion")}  # `extras` are carried for export only
  return reference, sphinx_model.Sphinx(config.model), jax.tree.map(jnp.asarray, params), tokenizer, \
      photo(model.image_size)


# ------------------------------------------------------------------------------------------ tests
def test_logits_match_the_torch_reference(pair):
  """One batch: row 0 with the image, row 1 text-only; each equals its own torch run, row 1 the bare decoder."""
  reference, ours, params, _, image = pair
  tokens = np.array([[1, 17, 5, 99, 42, 8, 64, 3, 120], [1, 33, 2, 90, 14, 77, 6, 51, 10]], np.int32)
  images = np.concatenate([image, np.zeros_like(image)])
  got = np.asarray(jax.jit(ours.apply)({"params": params}, tokens, images, np.array([True, False])))
  with_image = reference(torch.from_numpy(tokens[:1]).long(), reference.encode_image(torch_image(image))).numpy()
  text_only = reference(torch.from_numpy(tokens[1:]).long()).numpy()
  assert got.shape == (2, tokens.shape[1], VOCAB) and ours.image_words == image_tokens(ours.config)
  np.testing.assert_allclose(got[:1], with_image, rtol=0, atol=1e-4)
  np.testing.assert_allclose(got[1:], text_only, rtol=0, atol=1e-4)
  assert min(np.abs(with_image).max(), np.abs(text_only).max()) > 1.0  # not a comparison of near-zero arrays
  alone = np.asarray(jax.jit(ours.apply)({"params": params}, tokens[1:]))  # images=None: the decoder alone
  np.testing.assert_allclose(got[1:], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pair", ["tiny_sphinx"], indirect=True)  # one variant: the views are proved above
def test_greedy_decoding_matches_the_torch_loop(pair):
  reference, ours, params, tokenizer_path, image = pair
  tokenizer = Tokenizer.from_file(tokenizer_path)
  prompt = [1, 17, 5, 99, 42]
  image_block = reference.encode_image(torch_image(image))
  expected = list(prompt)
  for _ in range(20):  # the original's loop without a cache: full forward, argmax of the last position
    token = int(reference(torch.tensor([expected]), image_block)[0, -1].argmax())
    if token == tokenizer.eos_id:
      break
    expected.append(token)
  generator = Generator(ours, params, tokenizer, buckets=(16, 32))
  got = generator.generate_ids([prompt], image, max_new_tokens=20, temperature=0.0)[0]
  assert got == expected[len(prompt):]
  assert len(set(got)) > 1  # not one token repeated


def test_model_images_normalises_uint8_and_keeps_floats():
  pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  expected = (pixels / 255.0 - np.array(image_data.CLIP_MEAN)) / np.array(image_data.CLIP_STD)
  np.testing.assert_allclose(np.asarray(sphinx_model.model_images(pixels)), expected, rtol=0, atol=1e-6)
  floats = expected.astype(np.float32)
  np.testing.assert_array_equal(np.asarray(sphinx_model.model_images(floats)), floats)


def test_views_of_the_1024_px_variants_match_the_original():
  """llama_ens5_light / mixtral_sparse_ens5 cut their views like this (fp16 bicubic, unrounded 512 quadrants)."""
  model = presets.get_config("tiny_sphinx_tiny_1k").model
  image = photo(1024)
  x = torch_image(image)
  x224 = F.interpolate(x.half(), size=(224, 224), mode="bicubic").to(x)
  x448 = F.interpolate(x.half(), size=(448, 448), mode="bicubic").to(x)
  x512 = F.interpolate(x.half(), size=(512, 512), mode="bicubic").to(x)
  quads = lambda t, s: [t[..., :s, :s], t[..., :s, s:], t[..., s:, :s], t[..., s:, s:]]
  expected_small = torch.stack([x224] + quads(x448, 224), dim=1).permute(0, 1, 3, 4, 2).numpy()
  expected_large = torch.stack([x512] + quads(x, 512), dim=1).permute(0, 1, 3, 4, 2).numpy()
  small, large = sphinx_model.tower_views(jnp.asarray(image), model)
  # one fp16 step (about 1e-3 at these magnitudes) is REFERENCES.md §5's tolerance after an fp16 resize; a few
  # of the 1024 -> 224 outputs land one step apart
  np.testing.assert_allclose(np.asarray(small), expected_small, rtol=0, atol=2e-3)
  np.testing.assert_allclose(np.asarray(large), expected_large, rtol=0, atol=2e-3)
  np.testing.assert_array_equal(np.asarray(large)[:, 1:], expected_large[:, 1:])  # plain crops: exact
  assert not sphinx_model.convnext_half_input(model)


def test_layout_worked_example():
  bos, image, text = jnp.full((2, 1, 1), 9.0), jnp.array([[[1.0], [2.0]]] * 2), jnp.array([[[5.0], [6.0]]] * 2)
  x, positions, segments = sphinx_model.layout(bos, image, text, jnp.array([True, False]), jnp.array([0, 0]))
  assert x[..., 0].tolist() == [[9, 1, 2, 5, 6], [0, 0, 9, 5, 6]]
  assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
  assert segments.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
  # generation: a prompt one token short is shifted right by one, its padding wraps to the front
  x, positions, segments = sphinx_model.layout(bos, image, text, jnp.array([True, False]), jnp.array([1, 1]))
  assert x[..., 0].tolist() == [[6, 9, 1, 2, 5], [6, 0, 0, 9, 5]]
  assert positions.tolist() == [[0, 0, 1, 2, 3], [0, 0, 0, 0, 1]]
  assert segments.tolist() == [[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_wrong_image_size_is_refused():
  with pytest.raises(SphinxError, match="image_size is 448"):
    sphinx_model.model_images(np.zeros((1, 224, 224, 3), np.uint8), 448)
