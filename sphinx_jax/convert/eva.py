"""transformers `Blip2VisionModel` keys (`vision_model.*` of Blip2Model; `llma.qformer.vision_model.*` in SPHINX)
<-> our EVA ViT-g tower. convert/blip2.py calls this for the vision part of BLIP-2.

Keys are relative to `prefix` (default 'vision_model.'). No side tree: every key is used (returned side = {}).

  transformers key (after prefix)           torch shape     ours                               our shape
  embeddings.patch_embedding.weight | bias  [D, 3, p, p]|[D] patch_embed/kernel | bias         [p, p, 3, D] | [D]
  embeddings.class_embedding                [1, 1, D]       class_embedding                    [D]
  embeddings.position_embedding             [1, L, D]       position_embedding                 [L, D]
  encoder.layers.{i}.
    layer_norm1.weight | bias               [D]             blocks_{i}/attn_norm/scale | bias
    self_attn.qkv.weight | bias             [3D, D] | [3D]  blocks_{i}/attn/qkv/kernel | bias  [D, 3, N, H] | [3, N, H]
    self_attn.projection.weight | bias      [D, D] | [D]    blocks_{i}/attn/out/kernel | bias  [N, H, D] | [D]
    layer_norm2.weight | bias               [D]             blocks_{i}/mlp_norm/scale | bias
    mlp.fc1.weight | bias                   [F, D] | [F]    blocks_{i}/mlp/up/kernel | bias    [D, F] | [F]
    mlp.fc2.weight | bias                   [D, F] | [D]    blocks_{i}/mlp/down/kernel | bias  [F, D] | [D]
  post_layernorm.weight | bias              [D]             post_norm/scale | bias
The qkv bias moves whole, k part included (trainable in transformers). Scanned: `blocks/…`, leading [layers].
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from sphinx_jax.convert import vit as cv
from sphinx_jax.models.vision import eva

BLOCK = {
    "attn_norm/scale": ("encoder.layers.{i}.layer_norm1.weight", cv.SAME),
    "attn_norm/bias": ("encoder.layers.{i}.layer_norm1.bias", cv.SAME),
    "attn/qkv/kernel": ("encoder.layers.{i}.self_attn.qkv.weight", cv.SPLIT_OUT),
    "attn/qkv/bias": ("encoder.layers.{i}.self_attn.qkv.bias", cv.FLAT),
    "attn/out/kernel": ("encoder.layers.{i}.self_attn.projection.weight", cv.MERGE_IN),
    "attn/out/bias": ("encoder.layers.{i}.self_attn.projection.bias", cv.SAME),
    "mlp_norm/scale": ("encoder.layers.{i}.layer_norm2.weight", cv.SAME),
    "mlp_norm/bias": ("encoder.layers.{i}.layer_norm2.bias", cv.SAME),
    "mlp/up/kernel": ("encoder.layers.{i}.mlp.fc1.weight", cv.LINEAR),
    "mlp/up/bias": ("encoder.layers.{i}.mlp.fc1.bias", cv.SAME),
    "mlp/down/kernel": ("encoder.layers.{i}.mlp.fc2.weight", cv.LINEAR),
    "mlp/down/bias": ("encoder.layers.{i}.mlp.fc2.bias", cv.SAME),
}
TOP = [
    cv.Rule("patch_embed/kernel", "embeddings.patch_embedding.weight", cv.CONV),
    cv.Rule("patch_embed/bias", "embeddings.patch_embedding.bias"),
    cv.Rule("class_embedding", "embeddings.class_embedding", cv.LEAD2),
    cv.Rule("position_embedding", "embeddings.position_embedding", cv.LEAD1),
    cv.Rule("post_norm/scale", "post_layernorm.weight"),
    cv.Rule("post_norm/bias", "post_layernorm.bias"),
]
WHERE = "BLIP-2 EVA vision tower"


def keymap(config) -> cv.KeyMap:
  """`config`: the BLIP-2 config (qformer_config()): numbers from `.vision`, layout from `.scan`."""
  expected = cv.abstract_leaves(eva.EvaVit(cv.unscanned(config)), config.vision.image_size)
  return cv.KeyMap(TOP + cv.layer_rules(config.vision.layers, BLOCK), expected, [], {})


def to_ours(state: Mapping, config, *, prefix: str = "vision_model.", scan: bool | None = None,
             stack: Callable = np.stack) -> tuple[dict, dict]:
  """(params, {}) from transformers Blip2 vision keys under `prefix`; `scan` defaults to config.scan; `stack`
  as in vit.to_ours."""
  scan = config.scan if scan is None else scan
  return cv.to_ours(state, keymap(config), prefix=prefix, scan=scan, where=WHERE, stack=stack)


def to_torch(params, side, config, *, prefix: str = "vision_model.") -> dict:
  """{prefix + transformers key: array}, bit-exact inverse of `to_ours` (`side` is {})."""
  return cv.to_torch(params, side, keymap(config), prefix=prefix, where=WHERE)
