"""CLIP ViT-L/14 tower vs open_clip 2.24 (SPHINX's `clip_encode_image`), tiny width/depth, every weight random."""
import jax
import numpy as np
import open_clip
import pytest
import torch

import vit_reference as ref
from configs.sphinx import tiny_towers
from sphinx_jax.convert import clip as convert
from sphinx_jax.errors import SphinxError
from sphinx_jax.models.vision.clip import ClipVit

CONFIG = tiny_towers(256)["clip"]  # width 64, 2 layers, 4 heads, MLP 256, 224 px, text leftovers 64x32


def reference_model(quick_gelu: bool, seed: int = 0):
  """open_clip CLIP as llama_ens.py builds it (text transformer deleted), every weight randomised."""
  c = CONFIG
  model = open_clip.model.CLIP(
      c.embed_dim,
      dict(image_size=c.image_size, layers=c.layers, width=c.width, patch_size=c.patch,
           head_width=c.width // c.heads, mlp_ratio=c.mlp_dim / c.width),
      dict(context_length=c.text.context, vocab_size=c.text.vocab, width=c.text.width, heads=2, layers=1),
      quick_gelu=quick_gelu)
  model.transformer = None
  return ref.randomise(model.eval(), seed)


def images(seed=1, batch=2):
  return torch.randn(batch, 3, CONFIG.image_size, CONFIG.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("scan", [True, False])
def test_matches_open_clip(act, scan):
  model = reference_model(quick_gelu=act == "quick_gelu")
  x = images()
  with torch.no_grad():
    expected = ref.clip_encode_image(model, x)
  config = CONFIG.copy_and_resolve_references()
  config.act, config.scan = act, scan
  params, _ = convert.to_ours(ref.numpy_state(model), config)
  ours, out = ref.run(ClipVit(config, dtype=jax.numpy.float32), params, ref.nhwc(x))
  assert ours.shape == (2, 257, CONFIG.width)
  ref.assert_close(ours, expected)
  assert set(out) == {"stem", "encoded"}


def test_activation_choice_matters():
  """The two activations give different features, so the parity tests above do tell them apart."""
  model = reference_model(quick_gelu=False)
  x = images()
  params, _ = convert.to_ours(ref.numpy_state(model), CONFIG)
  config = CONFIG.copy_and_resolve_references()
  config.act = "quick_gelu"
  gelu, _ = ref.run(ClipVit(CONFIG, dtype=jax.numpy.float32), params, ref.nhwc(x))
  quick, _ = ref.run(ClipVit(config, dtype=jax.numpy.float32), params, ref.nhwc(x))
  assert np.abs(np.asarray(gelu) - np.asarray(quick)).max() > 1e-2


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(scan, dtype):
  model = reference_model(quick_gelu=False).to(dtype)
  params, side = convert.to_ours(ref.numpy_state(model), CONFIG, prefix="", scan=scan)
  assert "blocks" in params if scan else "blocks_1" in params
  assert side["logit_scale"].shape == () and side["text"]["token_embedding"].shape == (64, 32)
  ref.assert_same_state(convert.to_torch(params, side, CONFIG), model)


def test_prefix_composes():
  """Under `llma.clip.` (the accessory layout) next to other towers' keys: only its own keys are taken."""
  state = {f"llma.clip.{k}": v for k, v in ref.numpy_state(reference_model(False)).items()}
  state["llma.dinov2_vitg14.norm.weight"] = np.zeros(3, np.float32)
  params, side = convert.to_ours(state, CONFIG, prefix="llma.clip.")
  back = convert.to_torch(params, side, CONFIG, prefix="llma.clip.")
  assert set(back) == set(state) - {"llma.dinov2_vitg14.norm.weight"}


def test_bad_checkpoints_are_named():
  state = ref.numpy_state(reference_model(False))
  bad = dict(state, **{"visual.transformer.resblocks.1.attn.in_proj_weight": np.zeros((64, 64), np.float32)})
  with pytest.raises(SphinxError, match=r"resblocks\.1\.attn\.in_proj_weight.*\(64, 64\).*\(192, 64\)"):
    convert.to_ours(bad, CONFIG)
  with pytest.raises(SphinxError, match=r"visual\.ln_post\.bias.*missing"):
    convert.to_ours({k: v for k, v in state.items() if k != "visual.ln_post.bias"}, CONFIG)
  with pytest.raises(SphinxError, match=r"no place.*transformer\.resblocks\.0\.ln_1\.weight"):
    convert.to_ours(dict(state, **{"transformer.resblocks.0.ln_1.weight": np.ones(32, np.float32)}), CONFIG)
  params, side = convert.to_ours(state, CONFIG, scan=False)
  del params["blocks_1"]["mlp"]
  with pytest.raises(SphinxError, match=r"missing.*blocks_1/mlp/down/bias"):
    convert.to_torch(params, side, CONFIG)
