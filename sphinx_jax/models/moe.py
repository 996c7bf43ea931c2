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
Not ported: MegaBlocks/STK block-sparse kernels and the 128-row padding they need.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from sphinx_jax import sharding as sh
from sphinx_jax.config import MOE_DISPATCHES
from sphinx_jax.errors import SphinxError
from sphinx_jax.models import layers

AUX_COLLECTION = "aux_loss"


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


def grouped_dispatch(x, weights, experts, gate, up, down):
  """Sorted path: the N*K token copies ordered by expert, one ragged matmul per projection, then unsorted.

  Example (N=2, K=2, experts [[1, 0], [1, 2]]): copies 0..3 go to experts [1, 0, 1, 2]; sorted order
  [1, 0, 2, 3] gives groups of sizes [1, 2, 1]. Args as `dense_dispatch`. Returns: float[N, D].
  """
  n, k = experts.shape
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)  # copy index in expert order
  group_sizes = jnp.bincount(flat, length=gate.shape[0]).astype(jnp.int32)
  xs = x[order // k]  # [M, D]
  h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, group_sizes)) * jax.lax.ragged_dot(xs, up, group_sizes)
  ys = jax.lax.ragged_dot(h, down, group_sizes)  # [M, D], expert order
  ys = ys[jnp.argsort(order)].reshape(n, k, -1)  # a gather back to copy order (cheaper than a scatter on TPU)
  return jnp.einsum("NKD,NK->ND", ys, weights)


DISPATCH = {"dense": dense_dispatch, "grouped": grouped_dispatch}


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
    out = DISPATCH[self.dispatch](flat.astype(self.dtype), weights.astype(self.dtype), experts,
                                  gate.astype(self.dtype), up.astype(self.dtype), down.astype(self.dtype))
    return out.reshape(b, t, d)
