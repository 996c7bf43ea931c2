"""ConvNeXt tower vs timm `convnext_xxlarge` (tiny depths/dims, every weight random) and SPHINX's use of it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from configs import sphinx as presets
from sphinx_jax.convert import convnext as convert
from sphinx_jax.errors import SphinxError
from sphinx_jax.models.vision import convnext
from vit_reference import assert_close, assert_same_state, nhwc, numpy_state, randomise

PREFIX = "openclip_convnext_xxl."


def tiny_config(input_size=256, scan=True):
  c = presets.get_config("tiny_sphinx").model.convnext
  c.input_size, c.scan = input_size, scan
  return c


@pytest.fixture(scope="module")
def trunk():
  """timm's xxlarge structure at tiny size, trimmed as SPHINX does (head keeps only its norm)."""
  c = tiny_config()
  model = timm.create_model("convnext_xxlarge", pretrained=False, depths=tuple(c.depths), dims=tuple(c.dims),
                            num_classes=0)
  model.head.global_pool = torch.nn.Identity()
  model.head.flatten = torch.nn.Identity()
  return randomise(model.eval(), seed=0)


def _images(side, seed, batch=2):
  return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _run(params, config, images, **kw):
  module = convnext.ConvNeXt(config, dtype=jnp.float32, **kw)
  return jax.jit(lambda p, x: module.apply({"params": p}, x))(params, jnp.asarray(nhwc(images)))


def _torch_tokens(trunk, view, size):
  """The original's steps: fp16 nearest resize, trunk, 2x2 cell repeat (224 views), flatten, mean token first."""
  with torch.no_grad():
    x = F.interpolate(view.half(), size=(size, size)).to(view)
    fmap = trunk(x)
    if size == 256:
      fmap = fmap.repeat_interleave(2, dim=3).repeat_interleave(2, dim=2)
    tokens = fmap.flatten(-2).permute(0, 2, 1)
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)


@pytest.mark.parametrize("scan", [True, False])
def test_trunk_matches_timm(trunk, scan):
  config = tiny_config(scan=scan)
  params, side = convert.to_ours(numpy_state(trunk), config)
  assert side == {}
  images = _images(256, seed=1)
  _, out = _run(params, config, images, half_input=False)
  with torch.no_grad():
    want = trunk(images)
  assert want.shape[-2:] == (8, 8)
  assert_close(out["features"], want.permute(0, 2, 3, 1))


def test_sphinx_224_view_tokens(trunk):
  """224 view -> fp16 nearest 256 -> 8x8 -> 16x16 -> [mean, 256 tokens], against the same steps in torch."""
  config = tiny_config(256)
  params, _ = convert.to_ours(numpy_state(trunk), config)
  view = _images(224, seed=2)
  tokens, _ = _run(params, config, view)
  want = _torch_tokens(trunk, view, 256)
  assert tokens.shape == (2, 257, config.dims[-1])
  assert_close(tokens, want)


@pytest.mark.parametrize("half_input", [True, False])
def test_sphinx_512_path_tokens(trunk, half_input):
  """512 view -> trunk -> 16x16 -> 257 tokens; 1-view variants round to fp16 first, 5-view ones do not."""
  config = tiny_config(512)
  params, _ = convert.to_ours(numpy_state(trunk), config)
  view = _images(512, seed=3, batch=1)
  tokens, out = _run(params, config, view, half_input=half_input)
  assert out["features"].shape[1:3] == (16, 16)
  if half_input:
    want = _torch_tokens(trunk, view, 512)
  else:
    with torch.no_grad():
      flat = trunk(view).flatten(-2).permute(0, 2, 1)
    want = torch.cat([flat.mean(dim=1, keepdim=True), flat], dim=1)
  assert_close(tokens, want)


@pytest.mark.parametrize("scan", [True, False])
def test_round_trip_is_bit_exact(trunk, scan):
  state = {PREFIX + k: v for k, v in numpy_state(trunk).items()}
  config = tiny_config(scan=scan)
  params, side = convert.to_ours(state, config, prefix=PREFIX)
  leaf = params["stages_2"]["blocks" if scan else "blocks_1"]["fc1"]["kernel"]
  assert leaf.shape == ((2, 64, 256) if scan else (64, 256))
  back = convert.to_torch(params, side, config, prefix=PREFIX)
  assert_same_state({k[len(PREFIX):]: v for k, v in back.items()}, trunk)


def test_grid_tokens_repeat_and_mean_by_hand():
  """An 8x8 map of cell ids: each id covers a 2x2 patch of the 16x16 grid, row-major; the mean token is the ids'
  mean; the same map is refused as a 512-px trunk output (that one is 16x16); on an 8x8 token grid (a model whose
  ViTs use patch 28) each cell is one token."""
  fmap = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)
  tokens = convnext.grid_tokens(fmap, 256, 16)
  grid = np.asarray(tokens[0, 1:, 0]).reshape(16, 16)
  np.testing.assert_array_equal(grid[:2, :2], 0)
  np.testing.assert_array_equal(grid[14:, 14:], 63)
  np.testing.assert_array_equal(grid[0, 2:4], 1)
  np.testing.assert_array_equal(grid[2:4, 0], 8)
  assert float(tokens[0, 0, 0]) == pytest.approx(31.5)
  with pytest.raises(SphinxError, match="512"):
    convnext.grid_tokens(fmap, 512, 16)
  coarse = convnext.grid_tokens(fmap, 256, 8)
  np.testing.assert_array_equal(np.asarray(coarse[0, 1:, 0]), np.arange(64))
  assert float(coarse[0, 0, 0]) == pytest.approx(31.5)


def test_frozen_stops_gradients(trunk):
  config = tiny_config(256)
  params, _ = convert.to_ours(numpy_state(trunk), config)
  view = jnp.asarray(nhwc(_images(224, seed=4, batch=1)))

  def total(head_norm, frozen):  # gradient through the last norm only: cheap, and enough to see the stop
    p = dict(params, head_norm=head_norm)
    tokens, _ = convnext.ConvNeXt(config, dtype=jnp.float32, frozen=frozen).apply({"params": p}, view)
    return (tokens ** 2).sum()

  grad = jax.jit(jax.grad(total), static_argnums=1)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad(params["head_norm"], True)))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grad(params["head_norm"], False)))


def test_converter_rejects_bad_checkpoints(trunk):
  state = numpy_state(trunk)
  config = tiny_config()
  missing = dict(state)
  del missing["stages.2.blocks.1.gamma"]
  with pytest.raises(SphinxError, match=r"stages\.2\.blocks\.1\.gamma"):
    convert.to_ours(missing, config)
  wrong = dict(state, **{"stages.1.downsample.1.weight": np.zeros((32, 16, 3, 3), np.float32)})
  with pytest.raises(SphinxError, match=r"stages\.1\.downsample\.1\.weight.*\(32, 16, 2, 2\)"):
    convert.to_ours(wrong, config)
  extra = dict(state, **{"stages.3.blocks.1.gamma": np.zeros((128,), np.float32)})
  with pytest.raises(SphinxError, match=r"stages\.3\.blocks\.1\.gamma"):
    convert.to_ours(extra, config)


def test_bad_input_size_is_named():
  config = tiny_config(300)
  with pytest.raises(SphinxError, match="input_size"):
    convnext.ConvNeXt(config).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
