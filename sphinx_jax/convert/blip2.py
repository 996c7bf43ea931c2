"""transformers 4.57 `Blip2Model` keys without the language model (`llma.qformer.*` in SPHINX) <-> our BLIP-2
branch (models/vision/blip2.py). Numpy in and out; every layout is a transpose or reshape, so values move
bit-exactly both ways. No side tree (the returned side is {}).

Keys are relative to `prefix` (convert/accessory.py passes its own, e.g. 'qformer.'):
  query_tokens                                    [1, Q, D]        query_tokens             [Q, D]
  vision_model.*                                  EVA ViT-g        vision/…  (convert/eva.py)
  qformer.layernorm.weight | bias                 [D]              qformer/layernorm/scale | bias
  qformer.encoder.layer.{i}.                                       qformer/layers_{i}/
    attention.attention.{query,key,value}.weight  [N*H, D]           self_attn/{query,key,value}/kernel [D, N, H]
    attention.attention.{query,key,value}.bias    [N*H]              …/bias [N, H]
    attention.output.dense.weight | bias          [D, N*H] | [D]     self_attn/out/kernel | bias [N, H, D] | [D]
    attention.output.LayerNorm.weight | bias      [D]                self_attn/norm/scale | bias
    crossattention.* (i % frequency == 0)         key/value [N*H, E] cross_attn/… (key/value kernels [E, N, H])
    intermediate_query.dense.weight | bias        [F, D] | [F]       mlp_up/kernel | bias     [D, F]
    output_query.dense.weight | bias              [D, F] | [D]       mlp_down/kernel | bias   [F, D]
    output_query.LayerNorm.weight | bias          [D]                mlp_norm/scale | bias
Scanned trees hold qformer/groups/layer_{j}/… with a leading [layers / frequency] axis (layer i = g * frequency + j).
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sphinx_jax.convert import eva
from sphinx_jax.convert import vit as cv
from sphinx_jax.errors import SphinxError
from sphinx_jax.models.vision import qformer

WHERE = "BLIP-2 Q-Former"
VISION = "vision_model."
ATTENTION = {
    "query/kernel": ("attention.query.weight", cv.SPLIT_OUT),
    "query/bias": ("attention.query.bias", cv.FLAT),
    "key/kernel": ("attention.key.weight", cv.SPLIT_OUT),
    "key/bias": ("attention.key.bias", cv.FLAT),
    "value/kernel": ("attention.value.weight", cv.SPLIT_OUT),
    "value/bias": ("attention.value.bias", cv.FLAT),
    "out/kernel": ("output.dense.weight", cv.MERGE_IN),
    "out/bias": ("output.dense.bias", cv.SAME),
    "norm/scale": ("output.LayerNorm.weight", cv.SAME),
    "norm/bias": ("output.LayerNorm.bias", cv.SAME),
}
FEED_FORWARD = {
    "mlp_up/kernel": ("intermediate_query.dense.weight", cv.LINEAR),
    "mlp_up/bias": ("intermediate_query.dense.bias", cv.SAME),
    "mlp_down/kernel": ("output_query.dense.weight", cv.LINEAR),
    "mlp_down/bias": ("output_query.dense.bias", cv.SAME),
    "mlp_norm/scale": ("output_query.LayerNorm.weight", cv.SAME),
    "mlp_norm/bias": ("output_query.LayerNorm.bias", cv.SAME),
}
QUERY_TOKENS = cv.Rule("query_tokens", "query_tokens", cv.LEAD1)


def qformer_rules(config) -> list[cv.Rule]:
  """(unscanned path under qformer/, key under qformer.) for every Q-Former tensor of `config`."""
  c = config.qformer
  out = [cv.Rule("layernorm/scale", "layernorm.weight"), cv.Rule("layernorm/bias", "layernorm.bias")]
  for i in range(c.layers):
    parts = [("self_attn", "attention")]
    if i % c.cross_attention_frequency == 0:
      parts.append(("cross_attn", "crossattention"))
    for ours, theirs in parts:
      out += [cv.Rule(f"layers_{i}/{ours}/{path}", f"encoder.layer.{i}.{theirs}.{key}", layout)
              for path, (key, layout) in ATTENTION.items()]
    out += [cv.Rule(f"layers_{i}/{path}", f"encoder.layer.{i}.{key}", layout)
            for path, (key, layout) in FEED_FORWARD.items()]
  return out


def expected_shapes(config) -> dict:
  """Flat unscanned Q-Former path -> ShapeDtypeStruct, from jax.eval_shape of its init."""
  c = config.qformer
  queries = jax.ShapeDtypeStruct((1, config.num_query_tokens, c.hidden), jnp.float32)
  image = jax.ShapeDtypeStruct((1, 1, config.vision.width), jnp.float32)
  module = qformer.QFormer(cv.unscanned(config), dtype=jnp.float32)
  return cv.flatten(nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), queries, image))["params"])


_LAYER = re.compile(r"^layers_(\d+)/(.*)$")


def group_layers(flat: dict, frequency: int, stack: Callable = np.stack) -> dict:
  """`layers_{i}/x` -> `groups/layer_{i % frequency}/x` stacked over i // frequency (nn.scan's layout) by
  `stack(list)`."""
  out = {k: v for k, v in flat.items() if not _LAYER.match(k)}
  by_path: dict[str, list] = {}
  for i, sub in sorted((int(m.group(1)), m.group(2)) for k in flat if (m := _LAYER.match(k))):
    by_path.setdefault(f"groups/layer_{i % frequency}/{sub}", []).append(flat[f"layers_{i}/{sub}"])
  out.update({path: stack(leaves) for path, leaves in by_path.items()})
  return out


def ungroup_layers(flat: dict, frequency: int) -> dict:
  """Inverse of `group_layers`; an unscanned tree passes through unchanged."""
  out = {k: v for k, v in flat.items() if not k.startswith("groups/")}
  for path, stacked in flat.items():
    if path.startswith("groups/"):
      m = re.match(r"^groups/layer_(\d+)/(.*)$", path)
      if m is None or np.ndim(stacked) < 1:
        raise SphinxError(f"{WHERE}: scanned leaf {path!r} is not groups/layer_<j>/… with a leading group axis; "
                          "the tree is not a scanned Q-Former of this config.")
      j, sub = int(m.group(1)), m.group(2)
      out.update({f"layers_{g * frequency + j}/{sub}": stacked[g] for g in range(stacked.shape[0])})
  return out


def qformer_to_ours(state: Mapping, config, *, prefix: str, scan: bool, stack: Callable = np.stack) -> dict:
  """The qformer/ subtree from `Blip2QFormerModel` keys under `prefix` (checks presence and shapes only)."""
  flat = cv.take_all(state, qformer_rules(config), expected_shapes(config), prefix, WHERE)
  return cv.unflatten(group_layers(flat, config.qformer.cross_attention_frequency, stack) if scan else flat)


def qformer_to_torch(tree, config, *, prefix: str) -> dict:
  """{prefix + Blip2QFormerModel key: array} from the qformer/ subtree, scanned or not."""
  flat = ungroup_layers(cv.flatten(tree), config.qformer.cross_attention_frequency)
  return cv.give_all(flat, qformer_rules(config), expected_shapes(config), prefix, WHERE)


def to_ours(state: Mapping, config, *, prefix: str = "", scan: bool | None = None,
            stack: Callable = np.stack) -> tuple[dict, dict]:
  """(params, {}) from Blip2Model keys under `prefix`; every key there must be used. `scan` defaults to config.scan;
  `stack` as in vit.to_ours."""
  scan = config.scan if scan is None else scan
  vision, _ = eva.to_ours(state, config, prefix=prefix + VISION, scan=scan, stack=stack)
  tree = qformer_to_ours(state, config, prefix=prefix + "qformer.", scan=scan, stack=stack)
  tokens_shape = {"query_tokens": jax.ShapeDtypeStruct((config.num_query_tokens, config.qformer.hidden), jnp.float32)}
  tokens = cv.take_all(state, [QUERY_TOKENS], tokens_shape, prefix, WHERE)
  used = ({prefix + VISION + r.key for r in eva.keymap(config).rules}
          | {prefix + "qformer." + r.key for r in qformer_rules(config)} | {prefix + QUERY_TOKENS.key})
  cv.check_consumed(state, used, prefix, WHERE)
  return {"vision": vision, "query_tokens": tokens["query_tokens"], "qformer": tree}, {}


def to_torch(params, side, config, *, prefix: str = "") -> dict:
  """{prefix + Blip2Model key: array}, the bit-exact inverse of `to_ours` (scanned or unscanned; side {})."""
  missing = sorted({"vision", "query_tokens", "qformer"} - set(params))
  if missing or side:
    raise SphinxError(f"{WHERE}: the tree needs vision/, query_tokens and qformer/ and no side leaves; missing "
                      f"{missing}, side {sorted(cv.flatten(side))[:5]}. Export with the tree the converter gave.")
  state = eva.to_torch(params["vision"], {}, config, prefix=prefix + VISION)
  state.update(qformer_to_torch(params["qformer"], config, prefix=prefix + "qformer."))
  tokens = np.asarray(params["query_tokens"])
  want = (config.num_query_tokens, config.qformer.hidden)
  if tokens.shape != want:
    raise SphinxError(f"{WHERE}: query_tokens has shape {tokens.shape} but the config needs {want}; export with "
                      "the config the tree was built from.")
  state[prefix + QUERY_TOKENS.key] = QUERY_TOKENS.layout.to_torch(tokens)
  return state
