"""Mixtral sparse FFN of SPHINX-MoE; mirrors `MoE` in LLaMA2-Accessory `accessory/model/LLM/mixtral_sparse_ens.py`
(and `MixtralSparseMoeBlock` of transformers), SPHINX.md §2.2.

Letters: B batch, T length, N = B*T tokens, D width, E experts, K experts per token (top_k), F expert hidden width,
M = N*K routed token copies.
In: float[B, T, D]. Out: float[B, T, D]; the layer's load-balancing loss is sown as `aux_loss/load_balancing`
(keep it with `apply(..., mutable=["aux_loss"])`; `load_balancing_loss` averages the layers).
Router: logits and softmax in fp32 -> top-K -> weights renormalised to sum 1 -> cast to the activation dtype.
The original computes the router matmul in the activation dtype and only the softmax in fp32; here the logits
are fp32 too, so bf16 routing is a little more exact (identical in fp32).
Expert e: down_e(silu(x gate_e) * (x up_e)), weights stacked gate/up float[E, D, F], down float[E, F, D].
Dispatch (`moe.dispatch`), same math either way:
  'dense'    every expert on every token, combined with the sparse gates (zero off the top-K): E/K times the
             FLOPs, no data-dependent shapes; the reference for tests and small CPU runs.
  'grouped'  the M token copies sorted by expert, three `jax.lax.ragged_dot`s over contiguous groups, unsorted
             and combined; no capacity and no dropped tokens (the original's MegaBlocks kernels drop none either).
             Under a mesh, GSPMD places the ragged matmuls (it gathers the expert-sharded weights).
  'blocked'  the CPU-friendly grouped path: each expert's copies padded to a multiple of BLOCK_ROWS rows, one
             batched matmul over [blocks, BLOCK_ROWS, D] with each block's expert weights gathered; no dropping
             (at most N*K + E*(BLOCK_ROWS-1) rows). XLA's CPU `ragged_dot` is a masked dense matmul over all E
             experts' weights (E times the work), which makes 'grouped' slower than 'dense' on CPU.
  'expert_parallel'  explicit expert parallelism (`jax.shard_map` over the current mesh): tokens split over
             (data, fsdp, expert); each device sends its copies to the devices owning their experts with a
             `jax.lax.all_to_all` over 'expert', runs the grouped ragged matmuls on its E/P experts (F split over
             'tensor', partial sums added with a psum) and sends the results back. Static shapes need a buffer
             of C rows per (source, destination) pair: `capacity_factor` 0 (default) makes C = the source's
             M_local copies, lossless even when every copy goes to one device; f > 0 makes C =
             ceil(f * M_local / P) and drops the copies past it (their contribution is zero), as Switch/GShard.
Not ported: MegaBlocks/STK block-sparse kernels and the 128-row padding they need.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from sphinx_jax import sharding as sh
from sphinx_jax.config import MOE_DISPATCHES
from sphinx_jax.errors import SphinxError
from sphinx_jax.models import layers

AUX_COLLECTION = "aux_loss"
BLOCK_ROWS = 128  # 'blocked': rows per block (padding waste <= E*(BLOCK_ROWS-1) rows; weight gather per block)
TOKEN_AXES = ("data", "fsdp", "expert")  # expert_parallel splits the flat tokens over every non-tensor axis


def route(logits, top_k: int):
  """Mixtral routing. Args: logits float32[N, E]. Returns: probs float32[N, E] (softmax over all experts),
  weights float32[N, K] (the top-K probs renormalised to sum 1), experts int32[N, K] (descending prob)."""
  probs = jax.nn.softmax(logits, axis=-1)
  top, experts = jax.lax.top_k(probs, top_k)
  return probs, top / jnp.sum(top, axis=-1, keepdims=True), experts


def balancing_loss(probs, experts, num_experts: int):
  """E / (N*K) * sum_e count_e * mean_n probs[n, e]: the original's `_load_balancing_loss`.

  count_e (routed copies per expert) carries no gradient, as in the original; 1.0 when the router is uniform and
  balanced. Args: probs float32[N, E], experts int[N, K]. Returns: float32[].
  """
  n, k = experts.shape
  counts = jax.lax.stop_gradient(jnp.zeros(num_experts, jnp.float32).at[experts.reshape(-1)].add(1.0))
  return num_experts / (n * k) * jnp.dot(counts, jnp.mean(probs, axis=0))


def load_balancing_loss(aux_loss) -> jax.Array:
  """Mean over MoE layers of the sown per-layer losses (the `aux_loss` collection of one apply), float32[].

  A scanned decoder sows one float[L] leaf, an unscanned one a scalar per `layers_i`; the original averages
  over layers (`sum(LOAD_BALANCING_LOSSES) / len(...)`). The trainer adds `load_balancing_weight` times this.
  """
  leaves = jax.tree.leaves(aux_loss)
  if not leaves:
    raise SphinxError("aux_loss collection is empty: apply the model with mutable=['aux_loss'] and a MoE config.")
  return jnp.mean(jnp.concatenate([jnp.ravel(x) for x in leaves]))


def _swiglu_dense(x, gate, up, down):
  """Every expert on every token. x [N, D], gate/up [E, D, F], down [E, F, D]. Returns float[E, N, D]."""
  h = jax.nn.silu(jnp.einsum("ND,EDF->ENF", x, gate)) * jnp.einsum("ND,EDF->ENF", x, up)
  return jnp.einsum("ENF,EFD->END", h, down)


def dense_dispatch(x, weights, experts, gate, up, down):
  """Reference path: all experts on all tokens, summed with the top-K weights scattered to [N, E].

  Args: x float[N, D], weights float[N, K] (x's dtype), experts int[N, K]. Returns: float[N, D].
  """
  gates = jnp.sum(jax.nn.one_hot(experts, gate.shape[0], dtype=weights.dtype) * weights[..., None], axis=1)
  return jnp.einsum("END,NE->ND", _swiglu_dense(x, gate, up, down), gates)


def _grouped_swiglu(xs, ids, gate, up, down):
  """Row i of xs through expert ids[i]: rows sorted by expert, one ragged matmul per projection, unsorted.

  ids == E marks an empty buffer slot: sorted last, outside every group (callers never read its row).
  Args: xs float[R, D], ids int32[R], gate/up [E, D, F], down [E, F, D]. Returns: float[R, D].
  """
  order = jnp.argsort(ids, stable=True)  # empty slots (id E) last, outside the groups
  sizes = jnp.sum(jax.nn.one_hot(ids, gate.shape[0], dtype=jnp.int32), axis=0)
  rows = xs[order]
  h = jax.nn.silu(jax.lax.ragged_dot(rows, gate, sizes)) * jax.lax.ragged_dot(rows, up, sizes)
  return jax.lax.ragged_dot(h, down, sizes)[jnp.argsort(order)]


def grouped_dispatch(x, weights, experts, gate, up, down):
  """Sorted path: the N*K token copies ordered by expert, one ragged matmul per projection, then unsorted.

  Example (N=2, K=2, experts [[1, 0], [1, 2]]): copies 0..3 go to experts [1, 0, 1, 2]; sorted order
  [1, 0, 2, 3] gives groups of sizes [1, 2, 1]. Args as `dense_dispatch`. Returns: float[N, D].
  """
  n, k = experts.shape
  ys = _grouped_swiglu(jnp.repeat(x, k, axis=0), experts.reshape(-1), gate, up, down).reshape(n, k, -1)
  return jnp.einsum("NKD,NK->ND", ys, weights)


def group_rank(ids, num_groups: int):
  """How many earlier entries share each entry's id: its slot in that id's buffer.

  Example: ids [1, 0, 1, 1] (2 groups) -> [0, 0, 1, 2]. Args: ids int32[M]. Returns int32[M].
  """
  onehot = jax.nn.one_hot(ids, num_groups, dtype=jnp.int32)
  return jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)


def padded_layout(experts, num_experts: int, block: int):
  """The 'blocked' buffer: experts in order, each group padded to a multiple of `block` rows.

  Example (block 2, copies to experts [1, 0, 1, 1], 2 experts): expert 0 has 1 copy -> 1 block (rows 0..1),
  expert 1 has 3 -> 2 blocks (rows 2..5); copies land on rows [2, 0, 3, 4].
  Args: experts int32[M]. Returns: (rows int32[M], blocks per expert int32[E]).
  """
  counts = -(-jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.int32), axis=0) // block)
  return (jnp.cumsum(counts) - counts)[experts] * block + group_rank(experts, num_experts), counts


def blocked_dispatch(x, weights, experts, gate, up, down, block: int = BLOCK_ROWS):
  """CPU-friendly grouped path (module docstring): padded per-expert blocks, batched matmuls. Args as
  `dense_dispatch`. Returns: float[N, D]."""
  n, k = experts.shape
  e = gate.shape[0]
  rows, counts = padded_layout(experts.reshape(-1), e, block)
  blocks = -(-n * k // block) + e  # sum_e ceil(g_e / block) <= ceil(N*K / block) + E
  xb = jnp.zeros((blocks * block, x.shape[-1]), x.dtype).at[rows].set(jnp.repeat(x, k, axis=0))
  xb = xb.reshape(blocks, block, -1)
  # Expert of each block; blocks past the last group compute on zero rows that are never read.
  owner = jnp.minimum(jnp.searchsorted(jnp.cumsum(counts), jnp.arange(blocks), side="right"), e - 1)
  h = jax.nn.silu(jnp.einsum("BRD,BDF->BRF", xb, gate[owner])) * jnp.einsum("BRD,BDF->BRF", xb, up[owner])
  yb = jnp.einsum("BRF,BFD->BRD", h, down[owner]).reshape(blocks * block, -1)
  return jnp.einsum("NKD,NK->ND", yb[rows].reshape(n, k, -1), weights)


def capacity(copies: int, devices: int, capacity_factor: float) -> int:
  """Buffer rows per (source, destination): all `copies` when the factor is 0 (lossless), else
  ceil(factor * copies / devices), at most `copies`."""
  if capacity_factor <= 0:
    return copies
  return min(copies, math.ceil(capacity_factor * copies / devices))


def _expert_parallel_local(x, weights, experts, gate, up, down, capacity_factor):
  """One device's part of `expert_parallel_dispatch` (inside shard_map).

  Args: x float[n, D], weights float[n, K], experts int32[n, K] (global ids), gate/up [E/P, D, F/T],
  down [E/P, F/T, D]. Returns float[n, D], summed over 'tensor'.
  """
  n, k = experts.shape
  devices, local_experts = jax.lax.axis_size("expert"), gate.shape[0]
  flat = experts.reshape(-1)
  dest, local_id = flat // local_experts, flat % local_experts  # experts are laid out in contiguous blocks
  slot = group_rank(dest, devices)
  c = capacity(n * k, devices, capacity_factor)
  # Copies past the capacity fall outside the buffer: mode="drop" leaves them out, mode="fill" reads them as 0.
  send = jnp.zeros((devices, c, x.shape[-1]), x.dtype).at[dest, slot].set(jnp.repeat(x, k, axis=0), mode="drop")
  ids = jnp.full((devices, c), local_experts, jnp.int32).at[dest, slot].set(local_id, mode="drop")
  exchange = functools.partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0, tiled=True)
  received, received_ids = exchange(send), exchange(ids)  # [P, c, D]: row block j came from device j
  out = _grouped_swiglu(received.reshape(devices * c, -1), received_ids.reshape(-1), gate, up, down)
  back = exchange(out.reshape(devices, c, -1))  # [P, c, D]: block j holds our copies that went to device j
  ys = back.at[dest, slot].get(mode="fill", fill_value=0).reshape(n, k, -1)
  return jax.lax.psum(jnp.einsum("NKD,NK->ND", ys, weights), "tensor")


def expert_parallel_dispatch(x, weights, experts, gate, up, down, capacity_factor: float = 0.0):
  """Expert parallelism with all-to-all over the current mesh's 'expert' axis (see the module docstring).

  Args as `dense_dispatch`; needs `jax.set_mesh` with the ('data', 'fsdp', 'tensor', 'expert') axes and the
  experts divisible by the expert axis. Tokens are padded to a multiple of data x fsdp x expert with zero rows
  and weights (last, so they take the last buffer slots and never displace a real copy). Returns: float[N, D].
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "expert" not in mesh.axis_names:
    raise SphinxError("model.llm.moe.dispatch='expert_parallel' needs a device mesh with an 'expert' axis (run "
                      "under jax.set_mesh, as the trainer does); use 'grouped' without one.")
  if gate.shape[0] % mesh.shape["expert"]:
    raise SphinxError(f"model.llm.moe.dispatch='expert_parallel': {gate.shape[0]} experts do not divide over mesh "
                      f"expert={mesh.shape['expert']}; change config.mesh.expert.")
  n = x.shape[0]
  pad = -n % math.prod(mesh.shape[a] for a in TOKEN_AXES)
  x, weights, experts = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, weights, experts))
  tokens, expert_in, expert_out = P(TOKEN_AXES), P("expert", None, "tensor"), P("expert", "tensor", None)
  local = jax.shard_map(functools.partial(_expert_parallel_local, capacity_factor=capacity_factor),
                        in_specs=(tokens, tokens, tokens, expert_in, expert_in, expert_out), out_specs=tokens)
  return local(x, weights, experts, gate, up, down)[:n]


DISPATCH = {"dense": dense_dispatch, "grouped": grouped_dispatch, "blocked": blocked_dispatch,
            "expert_parallel": expert_parallel_dispatch}


def _expert_init(axes):
  # fan-in is D for gate/up ([E, D, F]) and F for down ([E, F, D]); E is a batch of independent matrices.
  return layers.partitioned(nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)), axes)


class MoeFeedForward(nn.Module):
  """The sparse SwiGLU FFN: router/kernel [D, E], gate, up [E, D, F], down [E, F, D]. float[B,T,D] -> same.

  Names follow convert/accessory_llm.py (`moe/router/kernel`, `moe/gate|up|down`).
  """
  num_experts: int
  top_k: int
  hidden: int
  dispatch: str = "grouped"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  capacity_factor: float = 0.0  # expert_parallel only; 0 = lossless

  @nn.compact
  def __call__(self, x):
    if self.dispatch not in DISPATCH:
      raise SphinxError(f"config.model.llm.moe.dispatch={self.dispatch!r}: unknown; use one of {MOE_DISPATCHES}.")
    b, t, d = x.shape
    e, f = self.num_experts, self.hidden
    # Replicated over 'expert' like the original's gate (E is tiny); fp32 logits for stable routing.
    router = layers.dense(e, (sh.EMBED, None), "router", dtype=jnp.float32, param_dtype=self.param_dtype)
    flat = x.reshape(b * t, d)
    probs, weights, experts = route(router(flat.astype(jnp.float32)), self.top_k)
    self.sow(AUX_COLLECTION, "load_balancing", balancing_loss(probs, experts, e))
    gate = self.param("gate", _expert_init((sh.EXPERT, sh.EMBED, sh.MLP)), (e, d, f), self.param_dtype)
    up = self.param("up", _expert_init((sh.EXPERT, sh.EMBED, sh.MLP)), (e, d, f), self.param_dtype)
    down = self.param("down", _expert_init((sh.EXPERT, sh.MLP, sh.EMBED)), (e, f, d), self.param_dtype)
    dispatch = DISPATCH[self.dispatch]
    if self.dispatch == "expert_parallel":
      dispatch = functools.partial(dispatch, capacity_factor=self.capacity_factor)
    out = dispatch(flat.astype(self.dtype), weights.astype(self.dtype), experts,
                   gate.astype(self.dtype), up.astype(self.dtype), down.astype(self.dtype))
    return out.reshape(b, t, d)
