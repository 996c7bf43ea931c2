"""Device mesh, logical-axis vocabulary and sharding helpers.

Model code names logical axes only (the constants below); one rules table in the config maps them to the
mesh axes ('data', 'fsdp', 'tensor', 'expert'). Sizes come from `config.mesh` (-1 = the rest of the devices).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sphinx_jax.errors import SphinxError

# The one vocabulary of logical axis names (decoder, then towers, then activations).
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab"
LAYERS = "layers"
EXPERT = "expert"
VIT_EMBED = "vit_embed"
VIT_MLP = "vit_mlp"
VIT_HEADS = "vit_heads"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
BATCH = "batch"
LENGTH = "length"
ACT_EMBED = "act_embed"

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# Default logical -> mesh rules (DESIGN.md "Sharding"). Logical names missing here stay replicated.
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (ACT_EMBED, None),
    (EMBED, "fsdp"),
    (VIT_EMBED, "fsdp"),
    (CONV_IN, "fsdp"),
    (MLP, "tensor"),
    (VIT_MLP, "tensor"),
    (HEADS, "tensor"),
    (VIT_HEADS, "tensor"),
    (KV_HEADS, "tensor"),
    (VOCAB, "tensor"),
    (CONV_OUT, "tensor"),
    (EXPERT, "expert"),
    (HEAD_DIM, None),
    (LAYERS, None),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Resolves the configured axis sizes (one may be -1) against the device count.

  Example: {data: 2, fsdp: -1, tensor: 2, expert: 1} on 8 devices -> (2, 2, 2, 1).
  """
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise SphinxError(f"mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}; fix config.mesh.")
  if any(s == 0 or s < -1 for s in sizes):
    raise SphinxError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}; fix config.mesh.")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise SphinxError(f"mesh: {dict(zip(MESH_AXES, sizes))} fixed sizes multiply to {fixed}, which does not "
                        f"divide {num_devices} devices; change config.mesh.")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise SphinxError(f"mesh: {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but "
                      f"{num_devices} are present; set one axis to -1 or match the device count.")
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` over ('data', 'fsdp', 'tensor', 'expert') laid out by `jax.experimental.mesh_utils`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)  # host devices have no physical topology to follow
  return Mesh(grid, MESH_AXES)


def rules_from_config(config) -> tuple:
  """The (logical, mesh) rules as the hashable tuple flax expects; `config.rules` overrides the default."""
  rules = config.get("rules", None) if hasattr(config, "get") else None
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in (rules or DEFAULT_RULES))


def param_shardings(abstract_params, mesh: Mesh, rules) -> Any:
  """NamedShardings for a (boxed or abstract) param tree annotated with `nn.with_logical_partitioning`."""
  logical = nn.get_partition_spec(abstract_params)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def strip_boxes(tree) -> Any:
  """The values inside the logical boxes of an abstract tree, with no sharding constraint applied.

  `nn.meta.unbox` constrains each value when a mesh is set, which fails on `jax.eval_shape` results (no
  sharding to constrain) under a mesh of devices this host cannot run on (`sphinx-jax compile`).
  """
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def count_params(tree) -> int:
  """Total number of elements over the leaves of a (possibly abstract) tree."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.meta.unbox(tree)))


def placed_abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (what `.lower` and Orbax's restore take instead of arrays)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
