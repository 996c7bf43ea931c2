"""Cloud TPU slice names -> device topologies that XLA can compile for on any host (libtpu, no TPU needed).

Follows Cloud TPU naming: `v4-N` and `v5p-N` count TensorCores (2 per chip, run as one megacore device per
chip) on a 3-D torus; `v5e-N` and `v6e-N` count chips (1 core each) on a 2-D grid. Grids grow by doubling the
smallest dimension (the last one on ties): 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...; 2-D 1x1, 1x2,
2x2, 2x4, 4x4, 4x8, 8x8, 8x16, 16x16. Wrap-around links: every dimension of a 3-D slice whose dimensions are
all >= 4; a 2-D dimension of 16 (a full v5e / v6e pod edge). Hosts hold 2x2x1 chips.
Multi-slice (`num_slices`) puts the mesh's `data` axis across slices (DCN) as well.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np
from jax.sharding import Mesh

from sphinx_jax import sharding as sh
from sphinx_jax.errors import SphinxError

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Generation:
  """What a TPU generation fixes: its libtpu name, grid rank, cores counted per chip, HBM and peak bf16 FLOP/s
  per chip (Cloud TPU system architecture pages)."""
  libtpu_name: str
  rank: int
  cores_per_chip: int
  chip_config: str
  hbm_bytes: int
  peak_flops: float
  max_chips: int


GENERATIONS = {
    "v4": Generation("v4", 3, 2, "megacore", 32 * GIB, 275e12, 4096),
    "v5p": Generation("v5", 3, 2, "megacore", 95 * GIB, 459e12, 8192),
    "v5e": Generation("v5e", 2, 1, "default", 16 * GIB, 197e12, 256),
    "v6e": Generation("v6e", 2, 1, "default", 32 * GIB, 918e12, 256),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A named slice (times `num_slices`): its devices (one per chip) and what the chips hold."""
  name: str
  generation: Generation
  grid: tuple
  num_slices: int
  devices: tuple

  @property
  def chips(self) -> int:
    return len(self.devices)


def grid_shape(chips: int, rank: int) -> tuple:
  """The standard grid of `chips` chips: double the smallest dimension (the last on ties) from 2x2x1 / 1x1.

  grid_shape(64, 3) = (4, 4, 4); grid_shape(128, 3) = (4, 4, 8); grid_shape(256, 2) = (16, 16).
  """
  dims = [2, 2, 1] if rank == 3 else [1, 1]
  while math.prod(dims) < chips:
    smallest = min(dims)
    dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
  return tuple(dims)


def wrap_links(grid: tuple) -> tuple:
  if len(grid) == 3:
    return (all(d >= 4 for d in grid),) * 3
  return (grid[0] == 16, grid[1] == 16, False)


def parse_name(name: str) -> tuple:
  """'v5p-128' -> (GENERATIONS['v5p'], chips=64). Raises SphinxError naming the accepted forms."""
  match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
  if not match:
    raise SphinxError(f"--topology {name}: expected <generation>-<size> with generation one of "
                      f"{sorted(GENERATIONS)}, e.g. v5p-128, v5e-256, v4-8, v6e-64.")
  generation = GENERATIONS[match.group(1)]
  cores = int(match.group(2))
  chips, rest = divmod(cores, generation.cores_per_chip)
  smallest = 4 if generation.rank == 3 else 1
  if rest or chips < smallest or chips > generation.max_chips or chips & (chips - 1):
    counted = "TensorCores (2 per chip)" if generation.cores_per_chip == 2 else "chips"
    raise SphinxError(f"--topology {name}: {match.group(1)} sizes count {counted}; use a power of two from "
                      f"{smallest * generation.cores_per_chip} to {generation.max_chips * generation.cores_per_chip}.")
  return generation, chips


def describe(name: str, num_slices: int = 1) -> Topology:
  """The devices of `num_slices` slices named `name`, from libtpu's topology tables (no TPU is contacted)."""
  if num_slices < 1:
    raise SphinxError(f"--num-slices {num_slices}: give 1 or more slices.")
  generation, chips = parse_name(name)
  grid = grid_shape(chips, generation.rank)
  # Compiling needs libtpu but no TPU; without this a second process on the host (a test run beside a train
  # job, say) is refused libtpu's lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
  except ImportError as error:  # pragma: no cover - jax always ships it
    raise SphinxError(f"jax.experimental.topologies is unavailable ({error}).") from None
  padded = grid + (1,) * (3 - len(grid))
  host = tuple(min(h, g) for h, g in zip((2, 2, 1), padded))
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{generation.libtpu_name}:{'x'.join(map(str, grid))}",
        chip_config_name=generation.chip_config, chips_per_host_bounds=host, num_slices=num_slices,
        wrap=wrap_links(grid))
  except Exception as error:  # libtpu missing or refusing the shape: say how to get it
    raise SphinxError(f"--topology {name}: libtpu could not describe it ({str(error).splitlines()[0]}); install "
                      f"the TPU extra: pip install 'jax[tpu]==0.10.2' (or `pip install -e .[tpu]`).") from None
  return Topology(name, generation, grid, num_slices, tuple(desc.devices))


def topology_mesh(mesh_config, topology: Topology) -> Mesh:
  """The ('data', 'fsdp', 'tensor', 'expert') mesh of `mesh_config` over the topology's devices.

  The sizes in `mesh_config` are per slice (-1 = the rest of a slice); with several slices `data` grows by
  `num_slices`, slices outermost, so only data-parallel traffic crosses the data-centre network.
  """
  per_slice = sh.mesh_shape(mesh_config, topology.chips // topology.num_slices)
  if topology.num_slices == 1:
    return sh.make_mesh(mesh_config, topology.devices)
  from jax.experimental import mesh_utils
  dcn = (topology.num_slices,) + (1,) * (len(per_slice) - 1)
  # A per-slice axis may need part of a physical axis (fsdp 8 on a 4x4 v5e slice), as in the single-slice mesh.
  grid = mesh_utils.create_hybrid_device_mesh(per_slice, dcn, devices=list(topology.devices),
                                              allow_split_physical_axes=True)
  return Mesh(np.asarray(grid), sh.MESH_AXES)
