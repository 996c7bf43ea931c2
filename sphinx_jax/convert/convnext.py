"""timm `convnext_xxlarge` trunk keys (open_clip `visual.trunk.*`; `llma.openclip_convnext_xxl.*` in SPHINX)
<-> our ConvNeXt tower (models/vision/convnext.py). Numpy in and out; every layout is a transpose, so values
move bit-exactly both ways. No side tree (every key is used; the returned side is {}).

Keys are relative to `prefix` (convert/accessory.py passes its own, e.g. 'openclip_convnext_xxl.'):
  timm key (after prefix)                 torch shape            ours                          our shape
  stem.0.weight | bias                    [C0, 3, 4, 4] | [C0]   stem_conv/kernel | bias       [4, 4, 3, C0]
  stem.1.weight | bias                    [C0]                   stem_norm/scale | bias
  stages.{s}.downsample.0.weight | bias   [C(s-1)]               stages_{s}/downsample_norm/…  (s >= 1)
  stages.{s}.downsample.1.weight | bias   [Cs, C(s-1), 2, 2]     stages_{s}/downsample_conv/…  [2, 2, C(s-1), Cs]
  stages.{s}.blocks.{j}.                                         stages_{s}/blocks_{j}/
    conv_dw.weight | bias                 [Cs, 1, 7, 7] | [Cs]     conv_dw_kernel | conv_dw_bias  [7, 7, 1, Cs]
    norm.weight | bias                    [Cs]                     norm/scale | bias
    mlp.fc1.weight | bias                 [4Cs, Cs] | [4Cs]        fc1/kernel | bias            [Cs, 4Cs]
    mlp.fc2.weight | bias                 [Cs, 4Cs] | [Cs]         fc2/kernel | bias            [4Cs, Cs]
    gamma                                 [Cs]                     gamma
  head.norm.weight | bias                 [C3]                   head_norm/scale | bias
Scanned trees hold `stages_{s}/blocks/…` with a leading [depth_s] axis.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sphinx_jax.convert import vit as cv
from sphinx_jax.models.vision import convnext

WHERE = "ConvNeXt tower"
BLOCK = {
    "conv_dw_kernel": ("conv_dw.weight", cv.CONV),
    "conv_dw_bias": ("conv_dw.bias", cv.SAME),
    "norm/scale": ("norm.weight", cv.SAME),
    "norm/bias": ("norm.bias", cv.SAME),
    "fc1/kernel": ("mlp.fc1.weight", cv.LINEAR),
    "fc1/bias": ("mlp.fc1.bias", cv.SAME),
    "fc2/kernel": ("mlp.fc2.weight", cv.LINEAR),
    "fc2/bias": ("mlp.fc2.bias", cv.SAME),
    "gamma": ("gamma", cv.SAME),
}
TOP = [
    cv.Rule("stem_conv/kernel", "stem.0.weight", cv.CONV),
    cv.Rule("stem_conv/bias", "stem.0.bias"),
    cv.Rule("stem_norm/scale", "stem.1.weight"),
    cv.Rule("stem_norm/bias", "stem.1.bias"),
    cv.Rule("head_norm/scale", "head.norm.weight"),
    cv.Rule("head_norm/bias", "head.norm.bias"),
]
DOWNSAMPLE = [
    ("downsample_norm/scale", "downsample.0.weight", cv.SAME),
    ("downsample_norm/bias", "downsample.0.bias", cv.SAME),
    ("downsample_conv/kernel", "downsample.1.weight", cv.CONV),
    ("downsample_conv/bias", "downsample.1.bias", cv.SAME),
]


def rules(config) -> list[cv.Rule]:
  """Every (our unscanned path, timm key, layout) of a trunk with `config.depths` blocks per stage."""
  out = list(TOP)
  for s, depth in enumerate(config.depths):
    if s > 0:
      out += [cv.Rule(f"stages_{s}/{path}", f"stages.{s}.{key}", layout) for path, key, layout in DOWNSAMPLE]
    out += [cv.Rule(f"stages_{s}/blocks_{j}/{path}", f"stages.{s}.blocks.{j}.{key}", layout)
            for j in range(depth) for path, (key, layout) in BLOCK.items()]
  return out


def expected_shapes(config) -> dict:
  """Flat unscanned path -> ShapeDtypeStruct of the tower's parameters (nothing materialised)."""
  module = convnext.ConvNeXt(cv.unscanned(config), dtype=jnp.float32)
  images = jax.ShapeDtypeStruct((1, config.input_size, config.input_size, 3), jnp.float32)
  tree = jax.eval_shape(module.init, jax.random.key(0), images)
  return cv.flatten(nn.meta.unbox(tree)["params"])


def _per_stage(flat: dict, fn: Callable[[dict], dict], stages: int) -> dict:
  """Applies `fn` (stack or unstack of `blocks_{j}` / `blocks`) inside each `stages_{s}/` subtree."""
  out = {k: v for k, v in flat.items() if not k.startswith("stages_")}
  for s in range(stages):
    head = f"stages_{s}/"
    sub = {k[len(head):]: v for k, v in flat.items() if k.startswith(head)}
    out.update({head + k: v for k, v in fn(sub).items()})
  return out


def to_ours(state: Mapping, config, *, prefix: str = "", scan: bool | None = None,
            stack: Callable = np.stack) -> tuple[dict, dict]:
  """(params, {}) from timm keys under `prefix`; every key there must be used. `scan` defaults to config.scan;
  `stack` as in vit.to_ours."""
  scan = config.scan if scan is None else scan
  key_rules = rules(config)
  flat = cv.take_all(state, key_rules, expected_shapes(config), prefix, WHERE)
  cv.check_consumed(state, {prefix + r.key for r in key_rules}, prefix, WHERE)
  if scan:
    flat = _per_stage(flat, functools.partial(cv.stack_layers, stack=stack), len(config.depths))
  return cv.unflatten(flat), {}


def to_torch(params, side, config, *, prefix: str = "") -> dict:
  """{prefix + timm key: array}, the bit-exact inverse of `to_ours` (scanned or unscanned `params`; side {})."""
  flat = _per_stage(cv.flatten(params), lambda sub: cv.unstack_layers(sub, WHERE), len(config.depths))
  flat.update(cv.flatten(side))
  return cv.give_all(flat, rules(config), expected_shapes(config), prefix, WHERE)
