"""open_clip CLIP ViT-L/14 state dict (as SPHINX stores it under `llma.clip.`) <-> our CLIP tower + side tree.

Keys are relative to `prefix` ('' for `open_clip.model.CLIP(...).state_dict()` after SPHINX's
`clip.transformer = None`; 'llma.clip.' inside a LLaMA2-Accessory checkpoint). Letters as in models/vision/vit.py.

  open_clip key                              torch shape    ours (towers/clip/…)         our shape
  visual.conv1.weight                        [D, 3, p, p]   patch_embed/kernel           [p, p, 3, D]
  visual.class_embedding                     [D]            class_embedding              [D]
  visual.positional_embedding                [L, D]         position_embedding           [L, D]
  visual.ln_pre.weight | bias                [D]            pre_norm/scale | bias        [D]
  visual.transformer.resblocks.{i}.
    ln_1.weight | bias                       [D]            blocks_{i}/attn_norm/scale | bias
    attn.in_proj_weight | in_proj_bias       [3D, D] | [3D] blocks_{i}/attn/qkv/kernel | bias  [D, 3, N, H] | [3, N, H]
    attn.out_proj.weight | bias              [D, D] | [D]   blocks_{i}/attn/out/kernel | bias  [N, H, D] | [D]
    ln_2.weight | bias                       [D]            blocks_{i}/mlp_norm/scale | bias
    mlp.c_fc.weight | bias                   [F, D] | [F]   blocks_{i}/mlp/up/kernel | bias    [D, F] | [F]
    mlp.c_proj.weight | bias                 [D, F] | [D]   blocks_{i}/mlp/down/kernel | bias  [F, D] | [D]
  visual.ln_post.weight | bias               [D]            post_norm/scale | bias       [D]
Side tree (unused by SPHINX, kept in torch layout): token_embedding.weight, positional_embedding, ln_final.*,
text_projection, logit_scale (0-d), visual.proj -> text/…, logit_scale, visual_projection (`side_shapes`).
Scanned trees hold `blocks/…` with a leading [layers] axis instead of `blocks_{i}/…`.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from sphinx_jax.convert import vit as cv
from sphinx_jax.models.vision import clip

BLOCK = {
    "attn_norm/scale": ("visual.transformer.resblocks.{i}.ln_1.weight", cv.SAME),
    "attn_norm/bias": ("visual.transformer.resblocks.{i}.ln_1.bias", cv.SAME),
    "attn/qkv/kernel": ("visual.transformer.resblocks.{i}.attn.in_proj_weight", cv.SPLIT_OUT),
    "attn/qkv/bias": ("visual.transformer.resblocks.{i}.attn.in_proj_bias", cv.FLAT),
    "attn/out/kernel": ("visual.transformer.resblocks.{i}.attn.out_proj.weight", cv.MERGE_IN),
    "attn/out/bias": ("visual.transformer.resblocks.{i}.attn.out_proj.bias", cv.SAME),
    "mlp_norm/scale": ("visual.transformer.resblocks.{i}.ln_2.weight", cv.SAME),
    "mlp_norm/bias": ("visual.transformer.resblocks.{i}.ln_2.bias", cv.SAME),
    "mlp/up/kernel": ("visual.transformer.resblocks.{i}.mlp.c_fc.weight", cv.LINEAR),
    "mlp/up/bias": ("visual.transformer.resblocks.{i}.mlp.c_fc.bias", cv.SAME),
    "mlp/down/kernel": ("visual.transformer.resblocks.{i}.mlp.c_proj.weight", cv.LINEAR),
    "mlp/down/bias": ("visual.transformer.resblocks.{i}.mlp.c_proj.bias", cv.SAME),
}
TOP = [
    cv.Rule("patch_embed/kernel", "visual.conv1.weight", cv.CONV),
    cv.Rule("class_embedding", "visual.class_embedding"),
    cv.Rule("position_embedding", "visual.positional_embedding"),
    cv.Rule("pre_norm/scale", "visual.ln_pre.weight"),
    cv.Rule("pre_norm/bias", "visual.ln_pre.bias"),
    cv.Rule("post_norm/scale", "visual.ln_post.weight"),
    cv.Rule("post_norm/bias", "visual.ln_post.bias"),
]
SIDE = {
    "text/token_embedding": "token_embedding.weight",
    "text/positional_embedding": "positional_embedding",
    "text/final_norm/scale": "ln_final.weight",
    "text/final_norm/bias": "ln_final.bias",
    "text/projection": "text_projection",
    "logit_scale": "logit_scale",
    "visual_projection": "visual.proj",
}
WHERE = "CLIP tower"


def keymap(config) -> cv.KeyMap:
  flat = cv.unscanned(config)
  expected = cv.abstract_leaves(clip.ClipVit(flat), config.image_size)
  side_rules, side_expected = cv.side_map(clip.side_shapes(config), SIDE)
  return cv.KeyMap(TOP + cv.layer_rules(config.layers, BLOCK), expected, side_rules, side_expected)


def to_ours(state: Mapping, config, *, prefix: str = "", scan: bool | None = None,
             stack: Callable = np.stack) -> tuple[dict, dict]:
  """(params, side) from an open_clip state dict; `scan` defaults to config.scan; `stack` as in vit.to_ours."""
  scan = config.scan if scan is None else scan
  return cv.to_ours(state, keymap(config), prefix=prefix, scan=scan, where=WHERE, stack=stack)


def to_torch(params, side, config, *, prefix: str = "") -> dict:
  """{prefix + open_clip key: array}: every key `to_ours` consumed, bit-exact."""
  return cv.to_torch(params, side, keymap(config), prefix=prefix, where=WHERE)
