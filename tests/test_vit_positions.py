"""The ViT position table's init (models/vision/vit.py `sincos_positions`): by-hand values, and what it is for: a
randomly initialised tower (the demo's) tells where each patch is, whatever the patch shows."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.sphinx import tiny_towers
from sphinx_jax.data import image as image_data
from sphinx_jax.data import shapes
from sphinx_jax.errors import SphinxError
from sphinx_jax.models.vision import vit
from sphinx_jax.models.vision.clip import ClipVit


def test_table_by_hand():
  """2x2 grid, width 8: frequencies 1 and 1/100; per cell [sin r f, cos r f, sin c f, cos c f]; class row 0."""
  table = np.asarray(vit.sincos_positions(None, (5, 8)))
  np.testing.assert_array_equal(table[0], 0)
  for cell, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)], start=1):
    want = [f(x * w) for x in (r, c) for f in (math.sin, math.cos) for w in (1.0, 0.01)]
    np.testing.assert_allclose(table[cell], want, rtol=0, atol=1e-6)
  with pytest.raises(SphinxError, match="square"):
    vit.sincos_positions(None, (6, 8))


def test_a_random_tower_tells_where_each_patch_is():
  """Synthetic-world scenes through a freshly initialised tiny CLIP: a least-squares read-out fitted on 24 images
  finds each patch's (row, col) on 8 others to within 0.1 of the image side (0.25 is chance). With the usual
  normal(0.02) table in its place the same read-out stays at chance (> 0.18): the patches' content swamps it."""
  config = tiny_towers(256)["clip"]
  model = ClipVit(config, dtype=jnp.float32)
  world = shapes.World(seed=3, max_objects=3)
  pixels = np.stack([image_data.padded_resize(world.sample(i, "vqa")[0], config.image_size) for i in range(32)])
  images = image_data.normalize(pixels)
  params = nn.meta.unbox(model.init(jax.random.key(0), images[:1]))
  grid = config.image_size // config.patch
  where = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij"), -1).reshape(-1, 2) / grid
  rows = lambda x: np.concatenate([x.reshape(-1, x.shape[-1]), np.ones((x.shape[0] * x.shape[1], 1))], axis=1)

  def readout_error(params):
    tokens = np.asarray(jax.jit(model.apply)(params, images)[0][:, 1:])  # [32, grid^2, width], class token dropped
    fit = np.linalg.lstsq(rows(tokens[:24]), np.tile(where, (24, 1)), rcond=None)[0]
    return np.abs(rows(tokens[24:]) @ fit - np.tile(where, (8, 1))).mean()

  assert readout_error(params) < 0.1
  table = params["params"]["position_embedding"]
  usual = {"params": {**params["params"], "position_embedding": 0.02 * jax.random.normal(jax.random.key(2),
                                                                                         table.shape)}}
  assert readout_error(usual) > 0.18
