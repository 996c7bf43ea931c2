"""DINOv2 ViT-g/14 tower vs the official dinov2 code (PyPI `dinov2`), tiny width/depth, every weight random."""
from functools import partial

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dinov2.layers import MemEffAttention, NestedTensorBlock
from dinov2.models.vision_transformer import DinoVisionTransformer

import vit_reference as ref
from configs.sphinx import tiny_towers
from sphinx_jax.convert import dinov2 as convert
from sphinx_jax.errors import SphinxError
from sphinx_jax.models.vision import vit
from sphinx_jax.models.vision.dinov2 import IMAGENET_MEAN, IMAGENET_STD, DinoV2

CONFIG = tiny_towers(512)["dinov2"]  # width 32, depth 2, 2 heads, SwiGLU 64, 37x37 stored grid, 224 px


def reference_model(seed: int = 0):
  """`vit_giant2` as the hub builds it (swiglufused, LayerScale 1.0, img 518, no chunks), at tiny width."""
  c = CONFIG
  model = DinoVisionTransformer(
      img_size=c.pos_grid * c.patch, patch_size=c.patch, embed_dim=c.width, depth=c.depth, num_heads=c.heads,
      mlp_ratio=3, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention), ffn_layer="swiglufused",
      init_values=1.0, block_chunks=0)
  assert model.blocks[0].mlp.w3.in_features == c.mlp_hidden  # (int(96 * 2/3) + 7) // 8 * 8 = 64
  return ref.randomise(model.eval(), seed)


def images(seed=1, batch=2):
  return torch.randn(batch, 3, CONFIG.image_size, CONFIG.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scan", [True, False])
def test_matches_official_dinov2(scan):
  model = reference_model()
  x = images()
  with torch.no_grad():
    expected = ref.sphinx_dinov2_features(model, x)
  config = CONFIG.copy_and_resolve_references()
  config.scan = scan
  params, _ = convert.to_ours(ref.numpy_state(model), config)
  ours, _ = ref.run(DinoV2(config, dtype=jnp.float32), params, ref.nhwc(x))
  assert ours.shape == (2, 257, CONFIG.width)
  ref.assert_close(ours, expected)


def test_derived_positions_follow_torch_scale_factor_semantics():
  """The 16x16 table equals torch's bicubic F.interpolate with scale_factor 16.1/37, and the hub model's own
  `interpolate_pos_encoding` for a 224 input; it differs from a plain 37 -> 16 `size=` resize."""
  model = reference_model()
  stored = model.pos_embed.detach()
  derived = convert.derive_positions(stored.numpy(), CONFIG)
  grid = stored[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
  with torch.no_grad():
    resized = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    hub = model.interpolate_pos_encoding(torch.zeros(1, 257, CONFIG.width), 224, 224)[0]
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=False)
  expected = torch.cat([stored[0, :1], resized.permute(0, 2, 3, 1).reshape(256, -1)]).numpy()
  np.testing.assert_allclose(derived, expected, rtol=0, atol=1e-5)
  np.testing.assert_allclose(derived, hub.numpy(), rtol=0, atol=1e-5)
  assert np.abs(derived[1:] - by_size.permute(0, 2, 3, 1).reshape(256, -1).numpy()).max() > 1e-2


def test_renormalisation_in_image_dtype():
  """bf16 views re-normalise with bf16 constants and per-op bf16 rounding, like `torch.Tensor(stats).to(image)`
  in llama_ens.py: bit-equal to torch."""
  x = images(batch=1).to(torch.bfloat16)
  expected = ref.dinov2_input(x)
  ours = vit.renormalise(jnp.asarray(ref.nhwc(x.float()), jnp.bfloat16), (IMAGENET_MEAN, IMAGENET_STD))
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(ours, np.float32), ref.nhwc(expected.float()))


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(scan, dtype):
  model = reference_model().to(dtype)
  params, side = convert.to_ours(ref.numpy_state(model), CONFIG, scan=scan)
  assert params["position_embedding"].shape == (257, CONFIG.width)
  assert side["source_position_embedding"].shape == (1, 1370, CONFIG.width) and side["mask_token"].shape == (1, 32)
  ref.assert_same_state(convert.to_torch(params, side, CONFIG), model)


def test_bad_checkpoints_are_named():
  state = ref.numpy_state(reference_model())
  with pytest.raises(SphinxError, match=r"'blocks\.0\.mlp\.w12\.weight'.*\(64, 32\).*\(128, 32\)"):
    convert.to_ours(dict(state, **{"blocks.0.mlp.w12.weight": np.zeros((64, 32), np.float32)}), CONFIG)
  with pytest.raises(SphinxError, match=r"'pos_embed'.*\(1, 257, 32\).*\(1, 1370, 32\)"):
    convert.to_ours(dict(state, pos_embed=np.zeros((1, 257, 32), np.float32)), CONFIG)
  with pytest.raises(SphinxError, match=r"register_tokens"):
    convert.to_ours(dict(state, register_tokens=np.zeros((1, 4, 32), np.float32)), CONFIG)
