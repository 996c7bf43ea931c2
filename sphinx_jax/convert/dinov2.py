"""DINOv2 hub state dict (`dinov2_vitg14`, no registers; `llma.dinov2_vitg14.*` in SPHINX) <-> our DINOv2 tower.

Keys are relative to `prefix` ('' for the hub model's state_dict(); 'llma.dinov2_vitg14.' in an accessory file).

  hub key                              torch shape        ours                                 our shape
  patch_embed.proj.weight | bias       [D, 3, p, p] | [D] patch_embed/kernel | bias            [p, p, 3, D] | [D]
  cls_token                            [1, 1, D]          class_embedding                      [D]
  pos_embed                            [1, 1+G*G, D]      side: source_position_embedding      (as stored)
                                                              -> position_embedding (derived)     [1+g*g, D]
  mask_token                           [1, D]             side: mask_token                     (as stored)
  blocks.{i}.
    norm1.weight | bias                [D]                blocks_{i}/attn_norm/scale | bias
    attn.qkv.weight | bias             [3D, D] | [3D]     blocks_{i}/attn/qkv/kernel | bias    [D, 3, N, H] | [3, N, H]
    attn.proj.weight | bias            [D, D] | [D]       blocks_{i}/attn/out/kernel | bias    [N, H, D] | [D]
    ls1.gamma                          [D]                blocks_{i}/attn_scale                [D]
    norm2.weight | bias                [D]                blocks_{i}/mlp_norm/scale | bias
    mlp.w12.weight | bias              [2F, D] | [2F]     blocks_{i}/mlp/gate_up/kernel | bias [D, 2, F] | [2, F]
    mlp.w3.weight | bias               [D, F] | [D]       blocks_{i}/mlp/down/kernel | bias    [F, D] | [D]
    ls2.gamma                          [D]                blocks_{i}/mlp_scale                 [D]
  norm.weight | bias                   [D]                post_norm/scale | bias

The derived table: the hub model resamples its G x G grid (G = 37) on every call for a g x g patch grid
(g = 16 at 224 px) with F.interpolate(bicubic, antialias off, scale_factor=(g + 0.1) / G) in fp32; here that
happens once, in `to_ours`, with the torch-compatible `resize.bicubic`, and the class row is copied. Export
writes the stored table from the side tree and drops the derived one (towers are frozen, so they agree).
Scanned trees hold `blocks/…` with a leading [depth] axis instead of `blocks_{i}/…`.
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from sphinx_jax.convert import vit as cv
from sphinx_jax.models.vision import dinov2, resize

BLOCK = {
    "attn_norm/scale": ("blocks.{i}.norm1.weight", cv.SAME),
    "attn_norm/bias": ("blocks.{i}.norm1.bias", cv.SAME),
    "attn/qkv/kernel": ("blocks.{i}.attn.qkv.weight", cv.SPLIT_OUT),
    "attn/qkv/bias": ("blocks.{i}.attn.qkv.bias", cv.FLAT),
    "attn/out/kernel": ("blocks.{i}.attn.proj.weight", cv.MERGE_IN),
    "attn/out/bias": ("blocks.{i}.attn.proj.bias", cv.SAME),
    "attn_scale": ("blocks.{i}.ls1.gamma", cv.SAME),
    "mlp_norm/scale": ("blocks.{i}.norm2.weight", cv.SAME),
    "mlp_norm/bias": ("blocks.{i}.norm2.bias", cv.SAME),
    "mlp/gate_up/kernel": ("blocks.{i}.mlp.w12.weight", cv.SPLIT_OUT),
    "mlp/gate_up/bias": ("blocks.{i}.mlp.w12.bias", cv.FLAT),
    "mlp/down/kernel": ("blocks.{i}.mlp.w3.weight", cv.LINEAR),
    "mlp/down/bias": ("blocks.{i}.mlp.w3.bias", cv.SAME),
    "mlp_scale": ("blocks.{i}.ls2.gamma", cv.SAME),
}
TOP = [
    cv.Rule("patch_embed/kernel", "patch_embed.proj.weight", cv.CONV),
    cv.Rule("patch_embed/bias", "patch_embed.proj.bias"),
    cv.Rule("class_embedding", "cls_token", cv.LEAD2),
    cv.Rule("post_norm/scale", "norm.weight"),
    cv.Rule("post_norm/bias", "norm.bias"),
]
SIDE = {"source_position_embedding": "pos_embed", "mask_token": "mask_token"}
WHERE = "DINOv2 tower"


def keymap(config) -> cv.KeyMap:
  expected = cv.abstract_leaves(dinov2.DinoV2(cv.unscanned(config)), config.image_size)
  side_rules, side_expected = cv.side_map(dinov2.side_shapes(config), SIDE)
  return cv.KeyMap(TOP + cv.layer_rules(config.depth, BLOCK), expected, side_rules, side_expected)


def derive_positions(stored: np.ndarray, config) -> np.ndarray:
  """float32[1+g*g, D] from the stored [1, 1+G*G, D] table, as `interpolate_pos_encoding` computes it.

  scale_factor = (g + interpolate_offset) / G, the hub code's `w0 / sqrt(N)` with w0 = g + 0.1 (a float64);
  torch then maps output to source coordinates with 1 / scale_factor (37/16.1 at 224 px), not G / g.
  """
  big, small = config.pos_grid, config.image_size // config.patch
  table = np.asarray(stored, np.float32)[0]
  grid = table[1:].reshape(big, big, -1)
  factor = (small + config.interpolate_offset) / big
  resized = np.asarray(resize.bicubic(grid, (small, small), scale_factor=factor, axes=(0, 1)))
  return np.concatenate([table[:1], resized.reshape(small * small, -1)], axis=0)


def to_ours(state: Mapping, config, *, prefix: str = "", scan: bool | None = None,
            stack: Callable = np.stack) -> tuple[dict, dict]:
  """(params, side) from a hub state dict; `params["position_embedding"]` is the derived table (fp32);
  `stack` as in vit.to_ours."""
  scan = config.scan if scan is None else scan
  params, side = cv.to_ours(state, keymap(config), prefix=prefix, scan=scan, where=WHERE, stack=stack)
  params["position_embedding"] = derive_positions(side["source_position_embedding"], config)
  return params, side


def to_torch(params, side, config, *, prefix: str = "") -> dict:
  """{prefix + hub key: array}: every key `to_ours` consumed, bit-exact (the derived table is not exported)."""
  return cv.to_torch(params, side, keymap(config), prefix=prefix, where=WHERE)
