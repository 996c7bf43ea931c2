"""Full-size CLIP ViT-L/14, DINOv2 ViT-g/14 and BLIP-2 EVA ViT-g: parameter counts via jax.eval_shape (nothing
materialised) against the originals' published numbers, and every torch key and shape of the full-size
originals (built on torch's meta device) against what our converters read and write.

Counting rule: the original's state-dict keys. CLIP counts its text leftovers and `visual.proj` (side tree).
DINOv2 counts the stored 37x37 `pos_embed` and `mask_token` (side tree) and NOT our derived 16x16 table, which
is no parameter of the original: count = our params - derived table + side tree.
"""
from functools import partial

import jax
import jax.numpy as jnp
import open_clip
import torch
from dinov2.layers import MemEffAttention, NestedTensorBlock
from dinov2.models.vision_transformer import DinoVisionTransformer
from transformers import Blip2VisionConfig, Blip2VisionModel

from sphinx_jax import config as cfg
from sphinx_jax import sharding as sh
from sphinx_jax.convert import clip as convert_clip
from sphinx_jax.convert import dinov2 as convert_dinov2
from sphinx_jax.convert import eva as convert_eva
from sphinx_jax.convert import vit as cv
from sphinx_jax.models.vision import clip, dinov2, eva

IMAGES = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)


def count(module) -> int:
  return sh.count_params(jax.eval_shape(module.init, jax.random.key(0), IMAGES)["params"])


def torch_shapes(keymap: cv.KeyMap) -> dict:
  """Torch key -> shape our converter expects (and writes) for every parameter and side leaf."""
  shapes = {r.key: cv.torch_shape(r.layout, keymap.expected[r.path].shape) for r in keymap.rules}
  shapes.update({r.key: tuple(keymap.side_expected[r.path].shape) for r in keymap.side_rules})
  return shapes


def meta_shapes(build) -> dict:
  with torch.device("meta"):
    model = build()
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_clip_vit_l14():
  config = cfg.clip_config()
  side = sh.count_params(clip.side_shapes(config))
  assert count(clip.ClipVit(config)) + side == 342_562_049

  def build():
    model = open_clip.model.CLIP(**open_clip.get_model_config("ViT-L-14"))  # what pretrained=None builds
    model.transformer = None  # as llama_ens.py
    return model
  assert torch_shapes(convert_clip.keymap(config)) == meta_shapes(build)


def test_dinov2_vitg14():
  config = cfg.dinov2_config()
  derived = 257 * 1536
  side = sh.count_params(dinov2.side_shapes(config))
  assert count(dinov2.DinoV2(config)) - derived + side == 1_136_480_768

  build = partial(DinoVisionTransformer, img_size=518, patch_size=14, embed_dim=1536, depth=40, num_heads=24,
                  mlp_ratio=4, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
                  ffn_layer="swiglufused", init_values=1.0, block_chunks=0,  # hub `vit_giant2`
                  drop_path_uniform=True)  # no drop path either way; avoids .item() on a meta linspace
  assert torch_shapes(convert_dinov2.keymap(config)) == meta_shapes(build)


def test_blip2_eva_vit_g():
  """985,952,256 = the BLIP-2 total 1,091,114,496 less the Q-Former and query tokens (asserted with them in
  the BLIP-2 tests); the key-by-key comparison with transformers below fixes it independently."""
  config = cfg.qformer_config()
  assert count(eva.EvaVit(config)) == 985_952_256

  v = config.vision  # the blip2-opt-2.7b vision_config
  build = lambda: Blip2VisionModel(Blip2VisionConfig(
      hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads, intermediate_size=v.mlp_dim,
      image_size=v.image_size, patch_size=v.patch, layer_norm_eps=v.eps, qkv_bias=True))
  assert torch_shapes(convert_eva.keymap(config)) == meta_shapes(build)
