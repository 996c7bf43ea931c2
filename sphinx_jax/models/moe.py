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
  'blocked'  the CPU grouped path: copies sorted by expert, each expert's group padded to a multiple of
             GRANULE_ROWS rows only (no dropping; at most N*K + E*(GRANULE_ROWS-1)), then cut into [BLOCK_ROWS, D]
             chunks as often as they fit and one chunk per smaller power-of-two multiple of the granule for the
             rest (`chunk_plan`: a 530-row group runs as 512 + 32 rows, not as 768 padded rows); a loop over the
             used experts slices each expert's weights once, and inner loops run its chunks' matmuls
             (`block_matmul`, with a custom VJP doing the same per-chunk work backwards). XLA's CPU `ragged_dot`
             is a masked dense matmul over all E experts' weights (E times the work), which makes 'grouped'
             slower than 'dense' on CPU.
  'expert_parallel'  explicit expert parallelism (`jax.shard_map` over the current mesh): tokens split over
             (data, fsdp, expert); each device sends its copies to the devices owning their experts with a
             `jax.lax.all_to_all` over 'expert', runs the grouped ragged matmuls on its E/P experts (F split over
             'tensor', partial sums added with a psum) and sends the results back. Static shapes need a buffer
             of C rows per (source, destination) pair: `capacity_factor` 0 (default) makes C = the source's
             M_local copies, lossless even when every copy goes to one device; f > 0 makes C =
             ceil(f * M_local / P) and drops the copies past it (their contribution is zero), as Switch/GShard.
  'auto'     the default (`pick_dispatch`): 'expert_parallel' under a mesh whose 'expert' axis is > 1 (any
             other path would all-gather the expert-sharded weights), else 'blocked' when the program is built
             for CPU and 'grouped' for TPU/GPU, where XLA lowers ragged_dot to a real grouped matmul.
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
BLOCK_ROWS = 512  # 'blocked': rows of the big matmul chunks (bench/moe.py)
GRANULE_ROWS = 32  # 'blocked': each expert's group is padded to a multiple of this (bench/moe.py)
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


def ragged_precision(dtype):
  """Precision of the ragged matmuls: the configured default, but DEFAULT for 16-bit operands, whose products are
  exact at every precision. XLA:TPU lowers ragged_dot to a Mosaic kernel that rejects bf16 operands at 'highest'
  ("Bad lhs type", libtpu 0.0.42), the precision our tests set for the whole process."""
  return jax.lax.Precision.DEFAULT if jnp.dtype(dtype).itemsize < 4 else None


def _grouped_swiglu(xs, ids, gate, up, down):
  """Row i of xs through expert ids[i]: rows sorted by expert, one ragged matmul per projection, unsorted.

  ids == E marks an empty buffer slot: sorted last, outside every group (callers never read its row).
  Args: xs float[R, D], ids int32[R], gate/up [E, D, F], down [E, F, D]. Returns: float[R, D].
  """
  order = jnp.argsort(ids, stable=True)  # empty slots (id E) last, outside the groups
  sizes = jnp.sum(jax.nn.one_hot(ids, gate.shape[0], dtype=jnp.int32), axis=0)
  rows = xs[order]
  matmul = functools.partial(jax.lax.ragged_dot, group_sizes=sizes, precision=ragged_precision(xs.dtype))
  h = jax.nn.silu(matmul(rows, gate)) * matmul(rows, up)
  return matmul(h, down)[jnp.argsort(order)]


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


def padded_layout(experts, num_experts: int, granule: int):
  """The 'blocked' buffer: experts in order, each group padded to a multiple of `granule` rows.

  Example (granule 2, copies to experts [1, 0, 1, 1], 2 experts): expert 0 has 1 copy -> 1 granule (rows 0..1),
  expert 1 has 3 -> 2 granules (rows 2..5); copies land on rows [2, 0, 3, 4].
  Args: experts int32[M]. Returns: (rows int32[M], granules per expert int32[E]).
  """
  counts = -(-jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.int32), axis=0) // granule)
  return (jnp.cumsum(counts) - counts)[experts] * granule + group_rank(experts, num_experts), counts


def chunk_sizes(big: int) -> tuple[int, ...]:
  """Chunk sizes in granules, largest first: big (a power of two), big/2, ..., 1. Example: 4 -> (4, 2, 1)."""
  return tuple(big >> j for j in range(big.bit_length()))


def chunk_plan(granules, big: int):
  """How each expert's padded group is cut into matmul chunks: chunks of `big` granules as often as they fit, then
  one chunk per set bit of the rest, so a group is padded to a granule only, and most rows go through big matmuls.

  Example (big 4, groups of [11, 2] granules laid out back to back, sizes (4, 2, 1)): expert 0 takes chunks
  [2, 1, 1] starting at granules [0, 8, 10]; expert 1 takes [0, 1, 0] starting at [11, 11, 13].
  Args: granules int32[E] (`padded_layout`). Returns: (chunks int32[E, S], first int32[E, S]) per size of
  `chunk_sizes(big)`: how many chunks of that size, and the granule where the first one starts.
  """
  sizes = chunk_sizes(big)
  chunks = jnp.stack([granules // big] + [(granules // s) % 2 for s in sizes[1:]], axis=1)
  lengths = chunks * jnp.array(sizes, jnp.int32)
  start = jnp.cumsum(granules) - granules
  return chunks, start[:, None] + jnp.cumsum(lengths, axis=1) - lengths


def _each_chunk(fn, x, w, chunks, first, big: int, granule: int, out_dim: int):
  """out[rows of chunk c] = fn(x[rows of c], w[e]) for every chunk c of every expert e (`chunk_plan`).

  Rows no chunk covers stay 0. The loops (while loops with traced bounds) run only over experts with rows and, per
  chunk size, over that expert's chunks; w[e] is sliced once per such expert (at most one pass over the weights
  per call), never per chunk. Args: x float[R, Din], w [E, ...], chunks/first int32[E, S]. Returns:
  float[R, out_dim].
  """
  busy = jnp.nonzero(jnp.sum(chunks, axis=1), size=chunks.shape[0])[0]  # experts with rows first

  def expert(i, out):
    e = busy[i]
    we = jax.lax.dynamic_index_in_dim(w, e, keepdims=False)
    for j, size in enumerate(chunk_sizes(big)):
      def one(c, out, j=j, rows=size * granule):
        at = first[e, j] * granule + c * rows
        return jax.lax.dynamic_update_slice_in_dim(
            out, fn(jax.lax.dynamic_slice_in_dim(x, at, rows), we).astype(out.dtype), at, 0)
      out = jax.lax.fori_loop(0, chunks[e, j], one, out)
    return out
  busy_count = jnp.sum(jnp.sum(chunks, axis=1) > 0)
  return jax.lax.fori_loop(0, busy_count, expert, jnp.zeros((x.shape[0], out_dim), x.dtype))


def _per_expert_outer(x, dy, chunks, first, big: int, granule: int):
  """dw[e] = sum over expert e's chunks c of x_c^T dy_c: the weight gradient of `block_matmul`.

  Args: x float[R, Din], dy float[R, Dout], chunks/first int32[E, S]. Returns: float[E, Din, Dout].
  """
  def expert(e, dw):
    acc = jnp.zeros(dw.shape[1:], dw.dtype)
    for j, size in enumerate(chunk_sizes(big)):
      def one(c, acc, j=j, rows=size * granule):
        at = first[e, j] * granule + c * rows
        xc, dyc = (jax.lax.dynamic_slice_in_dim(a, at, rows) for a in (x, dy))
        return acc + jnp.einsum("RI,RO->IO", xc, dyc).astype(acc.dtype)
      acc = jax.lax.fori_loop(0, chunks[e, j], one, acc)
    return jax.lax.dynamic_update_index_in_dim(dw, acc, e, 0)
  num_experts = chunks.shape[0]
  return jax.lax.fori_loop(0, num_experts, expert, jnp.zeros((num_experts, x.shape[1], dy.shape[1]), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def block_matmul(x, w, chunks, first, big: int, granule: int):
  """Grouped matmul over an expert-sorted, granule-padded buffer: chunk c of expert e is x_c @ w[e].

  A custom VJP because reverse mode cannot differentiate loops with traced trip counts; the backward runs the
  same loops (dx_c = dy_c @ w[e]^T, dw[e] = sum_c x_c^T dy_c), so it too does only the chunks' work.
  Args: x float[R, Din], w float[E, Din, Dout], chunks/first int32[E, S] (`chunk_plan`), big and granule as there.
  Returns: float[R, Dout]; rows outside every chunk are 0.
  """
  return _each_chunk(lambda rows, we: rows @ we, x, w, chunks, first, big, granule, w.shape[2])


def _block_matmul_fwd(x, w, chunks, first, big, granule):
  return block_matmul(x, w, chunks, first, big, granule), (x, w, chunks, first)


def _block_matmul_bwd(big, granule, residuals, dy):
  x, w, chunks, first = residuals
  transposed = lambda rows, we: jnp.einsum("RO,IO->RI", rows, we)  # noqa: E731
  dx = _each_chunk(transposed, dy, w, chunks, first, big, granule, w.shape[1])
  return dx, _per_expert_outer(x, dy, chunks, first, big, granule).astype(w.dtype), None, None


block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def block_rows(copies: int, num_experts: int) -> int:
  """Rows of the big chunks: BLOCK_ROWS, or for few tokens (decoding) the power of two >= the mean group size, at
  least 8, so that a handful of copies is not cut into BLOCK_ROWS-row matmuls. Example: 4096 copies over 8 experts
  -> 512; 2 copies (one token, top-2) -> 8."""
  return min(BLOCK_ROWS, max(8, 1 << (-(-copies // num_experts) - 1).bit_length()))


def blocked_dispatch(x, weights, experts, gate, up, down, block: int | None = None, granule: int | None = None):
  """CPU grouped path (module docstring): copies sorted into per-expert groups padded to `granule` rows (default
  min(GRANULE_ROWS, block)), each group cut into chunks of `block` rows (default `block_rows`) and one chunk per
  smaller power-of-two multiple of `granule`; per expert a loop over its chunks with that expert's weights, sliced
  once. Args as `dense_dispatch`; block // granule must be a power of two. Returns: float[N, D].
  """
  n, k = experts.shape
  e = gate.shape[0]
  block = block or block_rows(n * k, e)
  granule = granule or min(GRANULE_ROWS, block)
  big = block // granule
  if block % granule or big & (big - 1):
    raise SphinxError(f"blocked dispatch: block {block} must be a power-of-two multiple of granule {granule}.")
  rows, granules = padded_layout(experts.reshape(-1), e, granule)
  chunks, first = chunk_plan(granules, big)
  size = (-(-n * k // granule) + e) * granule  # sum_e ceil(g_e / granule) <= ceil(N*K / granule) + E
  xb = jnp.zeros((size, x.shape[-1]), x.dtype).at[rows].set(jnp.repeat(x, k, axis=0))
  matmul = lambda a, w: block_matmul(a, w, chunks, first, big, granule)  # noqa: E731
  yb = matmul(jax.nn.silu(matmul(xb, gate)) * matmul(xb, up), down)
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


def pick_dispatch() -> str:
  """What 'auto' means for the program being traced: by the current mesh (`jax.set_mesh`; an AOT compile for a
  TPU slice sets a mesh of TPU devices on a CPU host) or, without one, the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.shape.get("expert", 1) > 1:
    return "expert_parallel"
  device = None if mesh.empty else mesh.abstract_device
  return "blocked" if (device.platform if device else jax.default_backend()) == "cpu" else "grouped"


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
  dispatch: str = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  capacity_factor: float = 0.0  # expert_parallel only; 0 = lossless

  @nn.compact
  def __call__(self, x):
    name = pick_dispatch() if self.dispatch == "auto" else self.dispatch
    if name not in DISPATCH:
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
    dispatch = DISPATCH[name]
    if name == "expert_parallel":
      dispatch = functools.partial(dispatch, capacity_factor=self.capacity_factor)
    out = dispatch(flat.astype(self.dtype), weights.astype(self.dtype), experts,
                   gate.astype(self.dtype), up.astype(self.dtype), down.astype(self.dtype))
    return out.reshape(b, t, d)
