"""DINOv2 ViT-g/14 tower (`llma.dinov2_vitg14`, no registers); mirrors dinov2 `DinoVisionTransformer`
(`vit_giant2`, ffn "swiglufused", init_values 1.0, block_chunks 0) as SPHINX calls `forward_features` on 224-px
views and concatenates `x_norm_clstoken` and `x_norm_patchtokens` (SPHINX.md §3.5).

Letters: B batch, L 257 tokens, D width 1536, N 24 heads, H 64, F SwiGLU 4096.
In: float[B, 224, 224, 3], CLIP-normalised; re-normalised here to ImageNet statistics in the image dtype, as
llama_ens.py does before calling the hub model. Out: float[B, 257, 1536], final LayerNorm on every token.
Positions: `position_embedding` [257, D] is the class row plus the stored 37x37 grid resampled once, at
conversion (convert/dinov2.py), exactly as the hub model resamples it on every call for a 224 input.
Not ported: `mask_token` and the stored 37x37 table; both stay in the side tree (`side_shapes`) for export.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sphinx_jax.models.vision import vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ARCH = vit.Arch(patch_bias=True, pre_norm=False, layer_scale=True, input_stats=(IMAGENET_MEAN, IMAGENET_STD))


class DinoV2(vit.VisionTransformer):
  """`config`: sphinx_jax.config.dinov2_config()."""
  arch = ARCH

  def spec(self) -> vit.Spec:
    c = self.config
    return vit.Spec(width=c.width, depth=c.depth, heads=c.heads, mlp_dim=c.mlp_hidden, mlp="swiglu",
                    patch=c.patch, image_size=c.image_size, eps=c.eps, scan=c.scan)


def side_shapes(config, dtype=jnp.float32) -> dict:
  """Stored but unused leaves, in their torch layout: the pos_grid x pos_grid table (with its class row) and
  the masking token of DINOv2's training."""
  return {"source_position_embedding": jax.ShapeDtypeStruct((1, 1 + config.pos_grid ** 2, config.width), dtype),
          "mask_token": jax.ShapeDtypeStruct((1, config.width), dtype)}
