"""EVA ViT-g/14 of BLIP-2 (`llma.qformer.vision_model`); mirrors transformers `Blip2VisionModel` (4.57): patch
conv with bias, class token, positions (no pre-norm), 39 pre-norm layers with a fused qkv (its one bias is a
full trainable [3D] vector: the k part is zero only at initialisation), exact GELU MLP, `post_layernorm` on all
tokens. `Blip2Model.get_qformer_features` feeds the Q-Former `last_hidden_state`, which is post-layernormed.

Letters: B batch, L 257 tokens, D width 1408, N 16 heads, H 88, F MLP 6144.
In: float[B, 224, 224, 3], CLIP-normalised (BLIP-2 uses the same statistics). Out: float[B, 257, 1408].
`config` is the whole BLIP-2 config (sphinx_jax.config.qformer_config()): numbers from `.vision`, `.scan`.
"""
from __future__ import annotations

from sphinx_jax.models.vision import vit

ARCH = vit.Arch(patch_bias=True, pre_norm=False, layer_scale=False)


class EvaVit(vit.VisionTransformer):
  """`config`: sphinx_jax.config.qformer_config() (reads `.vision` and `.scan`)."""
  arch = ARCH

  def spec(self) -> vit.Spec:
    v = self.config.vision
    return vit.Spec(width=v.width, depth=v.layers, heads=v.heads, mlp_dim=v.mlp_dim, mlp="gelu", patch=v.patch,
                    image_size=v.image_size, eps=v.eps, scan=self.config.scan)
