"""CLIP ViT-L/14 tower (`llma.clip`); mirrors open_clip's `VisionTransformer` as SPHINX's `clip_encode_image`
runs it: conv1 (no bias) -> class token -> positions -> ln_pre -> 24 pre-norm blocks -> ln_post on ALL tokens,
and no `proj` (SPHINX.md §3.2).

Letters: B batch, L 257 tokens, D width 1024, N 16 heads, H 64, F MLP 4096.
In: float[B, 224, 224, 3], CLIP-normalised. Out: float[B, 257, 1024] (token 0 = class token), plus intermediates.
Activation (config `act`): 'gelu' (exact erf) is what the current original code runs, because it builds the
model with open_clip `pretrained=None`; 'quick_gelu' (x * sigmoid(1.702 x)) is what the OpenAI weights were
trained with and what SPHINX saw while training (open_clip `pretrained='openai'`). Both are tested.
Not run: the text leftovers and `visual.proj`; they stay in the side tree (`side_shapes`) for export.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sphinx_jax.models.vision import vit

ARCH = vit.Arch(patch_bias=False, pre_norm=True, layer_scale=False)


class ClipVit(vit.VisionTransformer):
  """`config`: sphinx_jax.config.clip_config()."""
  arch = ARCH

  def spec(self) -> vit.Spec:
    c = self.config
    return vit.Spec(width=c.width, depth=c.layers, heads=c.heads, mlp_dim=c.mlp_dim, mlp=c.act, patch=c.patch,
                    image_size=c.image_size, eps=c.eps, scan=c.scan)


def side_shapes(config, dtype=jnp.float32) -> dict:
  """Leaves the original stores but SPHINX never uses, in their torch layout (they are only carried).

  text/*: what open_clip's CLIP keeps after SPHINX deletes its text transformer; visual_projection: `visual.proj`.
  """
  t = config.text
  leaf = lambda *shape: jax.ShapeDtypeStruct(shape, dtype)
  return {
      "text": {"token_embedding": leaf(t.vocab, t.width), "positional_embedding": leaf(t.context, t.width),
               "final_norm": {"scale": leaf(t.width), "bias": leaf(t.width)},
               "projection": leaf(t.width, config.embed_dim)},
      "logit_scale": leaf(),
      "visual_projection": leaf(config.width, config.embed_dim),
  }
