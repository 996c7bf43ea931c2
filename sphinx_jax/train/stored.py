"""Reading a part of a model directory into a model being trained (`train.init_from`, `towers_from`, `llm_from`),
whichever layer layout the directory was written in.

Layer layouts (models/llama.py `stack_layers`): a scanned model holds its blocks as one `.../layers/...` subtree with
a leading [L] axis, an unscanned one as `.../layers_{i}/...`. A checkpoint of either layout starts a model of either:
a leaf the model wants but the directory lacks is taken from the other layout (one layer of a stacked leaf, or the
stack of the per-layer leaves), read to the host first; every other leaf is restored straight onto its sharding.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

from sphinx_jax.checkpoint import abstract_params, restore_leaves, unflatten
from sphinx_jax.errors import SphinxError

_LAYER = re.compile(r"^(?P<head>.*/)layers(?:_(?P<index>\d+))?/(?P<tail>.*)$")


class Source(NamedTuple):
  """How a wanted leaf is made: `paths` stored leaves, stacked when `stack`, else the first one's row `index`
  (None: the stored leaf itself)."""
  paths: tuple[str, ...]
  index: int | None = None
  stack: bool = False


def _source(path: str, depth: int, stored: Mapping[str, Any]) -> Source | None:
  """Where `path` (a leaf with `depth` rows when it is a stacked `layers/` leaf) comes from in `stored`."""
  if path in stored:
    return Source((path,))
  match = _LAYER.match(path)
  if match is None:
    return None
  head, index, tail = match["head"], match["index"], match["tail"]
  if index is not None:  # unscanned model, scanned directory
    stacked = f"{head}layers/{tail}"
    return Source((stacked,), int(index)) if stacked in stored else None
  per_layer = tuple(f"{head}layers_{i}/{tail}" for i in range(depth))
  return Source(per_layer, stack=True) if all(p in stored for p in per_layer) else None


def _shape(source: Source, stored: Mapping[str, Any]) -> tuple[int, ...]:
  first = tuple(stored[source.paths[0]].shape)
  if source.stack:
    return (len(source.paths),) + first
  return first[1:] if source.index is not None else first


def _depth_mismatch(sources: Mapping[str, Source], stored: Mapping[str, Any]) -> str:
  """Where an unscanned model reads a stacked directory: '' when every stack has as many rows as the model has
  layers under the same prefix, else what differs (a deeper stack would leave rows unread)."""
  model_depth: dict[str, int] = {}
  for p in sources:
    if (match := _LAYER.match(p)) and match["index"] is not None:
      model_depth[match["head"]] = max(model_depth.get(match["head"], 0), int(match["index"]) + 1)
  for s in sources.values():
    if s.index is not None:
      rows, head = stored[s.paths[0]].shape[0], _LAYER.match(s.paths[0])["head"]
      if rows != model_depth[head]:
        return f"{s.paths[0]} holds {rows} layers, this model {model_depth[head]}"
  return ""


def stored_params(key: str, path, expected: Mapping[str, Any], shardings: Mapping[str, Any],
                  parts: tuple[str, ...]) -> dict:
  """The leaves named in `shardings` ({path: sharding}) of the model directory `path`, in the layer layout of
  `expected` ({path: shape struct}, the model's); stored leaves under `parts` that the model does not use are an
  error too (a different variant or depth). `key` names the config key in errors."""
  stored = abstract_params(path)
  sources = {p: _source(p, expected[p].shape[0] if expected[p].shape else 0, stored) for p in sorted(shardings)}
  missing = [p for p, s in sources.items() if s is None]
  used = {q for s in sources.values() if s for q in s.paths}
  extra = sorted(p for p in set(stored) - used if p.split("/")[0] in parts)
  if missing or extra:
    raise SphinxError(f"config.train.{key}={path}: its parameters do not fit this model (missing {missing[:3]}, "
                      f"unexpected {extra[:3]}); use a checkpoint of the same variant and sizes.")
  if wrong := [p for p, s in sources.items() if _shape(s, stored) != tuple(expected[p].shape)]:
    raise SphinxError(f"config.train.{key}={path}: {wrong[0]} has shape {_shape(sources[wrong[0]], stored)}, this "
                      f"model's {tuple(expected[wrong[0]].shape)}; use a checkpoint of the same variant and sizes.")
  if short := _depth_mismatch(sources, stored):
    raise SphinxError(f"config.train.{key}={path}: {short}; use a checkpoint of the same depth.")
  direct = {p: shardings[p] for p, s in sources.items() if s.paths == (p,)}
  leaves = restore_leaves(path, sorted(direct), direct) if direct else {}
  if translated := {p: s for p, s in sources.items() if p not in direct}:
    host = restore_leaves(path, sorted({q for s in translated.values() for q in s.paths}))
    for p, s in translated.items():
      value = np.stack([host[q] for q in s.paths]) if s.stack else host[s.paths[0]][s.index]
      leaves[p] = jax.device_put(value, shardings[p])
  return unflatten(leaves)
