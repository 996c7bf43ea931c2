"""Train state and its shardings (MaxText/big_vision style: abstract first, then placed).

The state is built under `jax.eval_shape` so its logical boxes give every leaf (params and the Adam moments
alike) a NamedSharding before anything is materialised; frozen leaves have no optimizer state at all.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from sphinx_jax import sharding as sh


class TrainState(struct.PyTreeNode):
  """step int32[]; params; opt_state; nonfinite_in_row / nonfinite_total int32[] (skipped updates)."""
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_in_row: jax.Array
  nonfinite_total: jax.Array


def create(params, tx) -> TrainState:
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), nonfinite_in_row=zero,
                    nonfinite_total=zero)


def state_shardings(boxed_init: Callable[[], Any], tx, mesh, rules):
  """(abstract unboxed state, NamedSharding tree) for the state whose params `boxed_init()` returns boxed.

  Scalars and leaves without logical names are replicated.
  """
  def boxed_state():
    return create(boxed_init(), tx)
  abstract = jax.eval_shape(boxed_state)
  logical = nn.get_partition_spec(abstract)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs,
                           is_leaf=lambda x: isinstance(x, PartitionSpec))
  return sh.strip_boxes(abstract), shardings
