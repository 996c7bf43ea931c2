"""Key-map machinery of the ViT tower converters (convert/clip.py, dinov2.py, eva.py): named layouts (torch
tensor <-> our leaf, both ways), the walk that consumes every source key and checks every shape, and the
stack / unstack between the scanned (`blocks/…`, leading [depth]) and unscanned (`blocks_{i}/…`) trees.

A key map is data: `Rule(path, key, layout)` pairs our flat path ('blocks_3/attn/qkv/kernel') with the torch
key relative to a prefix ('visual.transformer.resblocks.3.attn.in_proj_weight'). Expected shapes come from
`jax.eval_shape` of the tower's init (unscanned), so a mis-shaped tensor is named before anything is moved.
Arrays are numpy of any dtype (bf16 via ml_dtypes); every layout is a transpose or a reshape, so values move
bit-exactly both ways. Letters: D width, N heads, H head dim, F MLP width, p patch.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from sphinx_jax.errors import SphinxError


class Layout(NamedTuple):
  """to_ours(torch array, our shape) -> our leaf; to_torch(our leaf) -> torch array."""
  to_ours: Callable[[np.ndarray, tuple], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


SAME = Layout(lambda t, shape: t, lambda a: a)
LINEAR = Layout(lambda t, shape: t.T, lambda a: a.T)                      # [out, in] <-> [in, out]
CONV = Layout(lambda t, shape: t.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))  # OIHW <-> HWIO
# [3*N*H, D] <-> [D, 3, N, H] (q, k, v rows) and [2*F, D] <-> [D, 2, F] (SwiGLU halves): the output rows
# split into our trailing axes, the input moves first.
SPLIT_OUT = Layout(lambda t, shape: np.moveaxis(t.reshape(*shape[1:], shape[0]), -1, 0),
                   lambda a: np.moveaxis(a, 0, -1).reshape(-1, a.shape[0]))
MERGE_IN = Layout(lambda t, shape: t.T.reshape(shape), lambda a: a.reshape(-1, a.shape[-1]).T)  # [D, N*H] <-> [N, H, D]
FLAT = Layout(lambda t, shape: t.reshape(shape), lambda a: a.reshape(-1))  # fused biases [3*N*H] <-> [3, N, H]
LEAD1 = Layout(lambda t, shape: t.reshape(shape), lambda a: a[None])       # [1, L, D] <-> [L, D]
LEAD2 = Layout(lambda t, shape: t.reshape(shape), lambda a: a[None, None])  # [1, 1, D] <-> [D]


class Rule(NamedTuple):
  path: str
  key: str
  layout: Layout = SAME


def layer_rules(depth: int, table: Mapping[str, tuple[str, Layout]]) -> list[Rule]:
  """Per-layer rules from one block table {our sub-path: (torch key with `{i}`, layout)}, unscanned paths."""
  return [Rule(f"blocks_{i}/{sub}", key.format(i=i), layout)
          for i in range(depth) for sub, (key, layout) in table.items()]


def abstract_leaves(module, image_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat path -> shape of `module`'s parameters (nothing materialised); build `module` unscanned."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  tree = jax.eval_shape(module.init, jax.random.key(0), images)
  return flatten(nn.meta.unbox(tree)["params"])


def flatten(tree) -> dict:
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


def torch_shape(layout: Layout, shape: tuple) -> tuple:
  """The torch shape that lands on our `shape` (zero-stride stand-in: no memory touched)."""
  return layout.to_torch(np.broadcast_to(np.zeros((), np.float32), shape)).shape


def take_all(state: Mapping, rules: list[Rule], expected: dict, prefix: str, where: str) -> dict:
  """Our flat leaves for `rules` from torch `state`, after checking presence and shape of every key."""
  flat = {}
  for rule in rules:
    key = prefix + rule.key
    if key not in state:
      raise SphinxError(f"{where}: key {key!r} is missing from the checkpoint; it is not a complete "
                        "tower of this config (check the prefix and the tower config).")
    tensor = np.asarray(state[key])
    want = torch_shape(rule.layout, expected[rule.path].shape)
    if tensor.shape != want:
      raise SphinxError(f"{where}: {key!r} has shape {tuple(tensor.shape)} but this config needs {want}; "
                        "the checkpoint and the tower config do not match.")
    flat[rule.path] = rule.layout.to_ours(tensor, expected[rule.path].shape)
  return flat


def check_consumed(state: Mapping, keys: set[str], prefix: str, where: str) -> None:
  """Every source key under `prefix` must have been used: a converter never drops a tensor silently."""
  leftovers = sorted(k for k in state.keys() if k.startswith(prefix) and k not in keys)
  if leftovers:
    raise SphinxError(f"{where}: {len(leftovers)} checkpoint key(s) have no place in the tower, e.g. "
                      f"{leftovers[:5]}; the checkpoint holds more than this tower (wrong prefix or variant?).")


def give_all(flat: dict, rules: list[Rule], expected: dict, prefix: str, where: str) -> dict:
  """Torch state {prefix + key: array} from our flat leaves, after checking the tree is exactly `expected`."""
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    raise SphinxError(f"{where}: the parameter tree does not match the tower config (missing {missing[:5]}, "
                      f"unexpected {extra[:5]}); export with the config the tree was built from.")
  for path, leaf in flat.items():
    if tuple(leaf.shape) != tuple(expected[path].shape):
      raise SphinxError(f"{where}: leaf {path!r} has shape {tuple(leaf.shape)} but the config needs "
                        f"{tuple(expected[path].shape)}; export with the config the tree was built from.")
  return {prefix + r.key: r.layout.to_torch(np.asarray(flat[r.path])) for r in rules}


_LAYER = re.compile(r"^blocks_(\d+)/(.*)$")


def stack_layers(flat: dict, stack: Callable = np.stack) -> dict:
  """`blocks_{i}/x` -> `blocks/x` stacked on a leading [depth] axis (nn.scan's layout) by `stack(list)`."""
  out = {k: v for k, v in flat.items() if not _LAYER.match(k)}
  subs = sorted({_LAYER.match(k).group(2) for k in flat if _LAYER.match(k)})
  depth = 1 + max((int(_LAYER.match(k).group(1)) for k in flat if _LAYER.match(k)), default=-1)
  out.update({f"blocks/{sub}": stack([flat[f"blocks_{i}/{sub}"] for i in range(depth)]) for sub in subs})
  return out


def unstack_layers(flat: dict, where: str) -> dict:
  """Inverse of `stack_layers`; an unscanned tree passes through unchanged."""
  out = {k: v for k, v in flat.items() if not k.startswith("blocks/")}
  for path, stacked in flat.items():
    if path.startswith("blocks/"):
      if np.ndim(stacked) < 1:
        raise SphinxError(f"{where}: scanned leaf {path!r} has no layer axis; the tree is not a scanned tower.")
      out.update({f"blocks_{i}/{path[len('blocks/'):]}": stacked[i] for i in range(stacked.shape[0])})
  return out


class KeyMap(NamedTuple):
  """One tower: rules and expected (unscanned) shapes of its parameters and of its side tree."""
  rules: list[Rule]
  expected: dict
  side_rules: list[Rule]
  side_expected: dict


def side_map(side_shapes: dict, keys: Mapping[str, str]) -> tuple[list[Rule], dict]:
  """Rules and expected shapes of a side tree {our side path: torch key}; leaves keep their torch layout."""
  return [Rule(path, key) for path, key in keys.items()], flatten(side_shapes)


def unscanned(config):
  """A copy of a tower config with `scan` off: key maps and expected shapes are written per layer."""
  config = config.copy_and_resolve_references()
  config.scan = False
  return config


def to_ours(state: Mapping, keymap: KeyMap, *, prefix: str, scan: bool, where: str,
            stack: Callable = np.stack) -> tuple[dict, dict]:
  """(params, side) nested trees from torch `state`; every key under `prefix` must be consumed. `stack` builds
  each scanned leaf from its per-layer arrays (convert/accessory.py passes a lazy one to stream the import)."""
  flat = take_all(state, keymap.rules, keymap.expected, prefix, where)
  side = take_all(state, keymap.side_rules, keymap.side_expected, prefix, where)
  check_consumed(state, {prefix + r.key for r in keymap.rules + keymap.side_rules}, prefix, where)
  return unflatten(stack_layers(flat, stack) if scan else flat), unflatten(side)


def to_torch(params, side, keymap: KeyMap, *, prefix: str, where: str) -> dict:
  """{prefix + torch key: array} from (params, side); scanned and unscanned trees are both accepted."""
  state = give_all(unstack_layers(flatten(params), where), keymap.rules, keymap.expected, prefix, where)
  state.update(give_all(flatten(side), keymap.side_rules, keymap.side_expected, prefix, where))
  return state
