"""Full-size ConvNeXt-XXLarge trunk and BLIP-2 branch (EVA ViT-g + Q-Former + query tokens): parameter counts
via jax.eval_shape (nothing materialised) against the originals' numbers, and every torch key and shape of the
full-size originals (built on torch's meta device) against what our converters read and write."""
import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch
from flax import linen as nn
from transformers import Blip2Config, Blip2Model

from sphinx_jax import config as cfg
from sphinx_jax import sharding as sh
from sphinx_jax.convert import blip2 as convert_blip2
from sphinx_jax.convert import convnext as convert_convnext
from sphinx_jax.models.vision import blip2, convnext


def abstract_params(module, side=224):
  images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), images)["params"]


def exported_shapes(to_torch, config, params) -> dict:
  """Torch key -> shape that our exporter writes for an abstract tree (zero-stride stand-ins, no memory)."""
  stand_in = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), params)
  return {k: tuple(v.shape) for k, v in to_torch(stand_in, {}, config).items()}


def meta_shapes(build) -> dict:
  with torch.device("meta"):
    model = build()
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_convnext_xxlarge_trunk():
  config = cfg.convnext_config()
  params = nn.meta.unbox(abstract_params(convnext.ConvNeXt(config)))
  assert sh.count_params(params) == 843_398_016

  def build():  # open_clip's trunk as SPHINX trims it: head keeps only its norm
    model = timm.create_model("convnext_xxlarge", pretrained=False, num_classes=0)
    model.head.global_pool = torch.nn.Identity()
    model.head.flatten = torch.nn.Identity()
    return model
  assert exported_shapes(convert_convnext.to_torch, config, params) == meta_shapes(build)


def test_blip2_branch():
  config = cfg.qformer_config()
  params = nn.meta.unbox(abstract_params(blip2.Blip2(config)))
  assert sh.count_params(params) == 1_091_114_496

  def build():  # blip2-opt-2.7b's vision and Q-Former configs; the language model is dropped as in SPHINX
    v = config.vision
    model = Blip2Model(Blip2Config(
        vision_config=dict(hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads,
                           intermediate_size=v.mlp_dim, image_size=v.image_size, patch_size=v.patch,
                           layer_norm_eps=v.eps, qkv_bias=True),
        qformer_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            encoder_hidden_size=v.width, cross_attention_frequency=2),
        text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                         vocab_size=64, word_embed_proj_dim=16),
        num_query_tokens=32))
    model.language_projection = None
    model.language_model = None
    return model
  assert exported_shapes(convert_blip2.to_torch, config, params) == meta_shapes(build)
