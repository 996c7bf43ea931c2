"""The decoder's output head and its next-token cross-entropy in one pass over chunks of positions, without the
[B, T, V] logits: the `lm_head` matmul of accessory/model/LLM/llama.py followed by the
`CrossEntropyLoss(ignore_index=0)` of accessory/model/meta.py (which the mask `weights` expresses here).

Letters: B batch, T positions, C positions per chunk, D width, V vocab.
In:  hidden float[B, T, D] (after the final norm), kernel float[D, V] (lm_head), targets int[B, T],
     weights float[B, T] (1 = a trained target, 0 = ignored; not differentiated).
Out: (nll_sum float32[]: sum of weights * -log softmax(hidden @ kernel)[target], correct float32[]: sum of
     weights where the argmax is the target).

Why fused: at V 32000 the logits of a [4, 512] batch are 262 MB in f32, of a TPU chip's 8 x 4096 rows 4.2 GB, and
the plain autodiff path writes them, their softmax, their gradient and (on CPU) a transposed copy of it. Under
`jax.grad` every chunk's gradients are computed in the forward pass, while its logits are fresh: the loss is a sum,
so its cotangent is one scalar g and the backward only scales the saved d(hidden) and d(kernel) by g. The FLOPs are
the unfused ones (three matmuls of the head), nothing is recomputed, and only one chunk's logits exist at a time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def chunk_count(batch: int, length: int, rows: int) -> int:
  """The fewest chunks of the positions axis whose [batch, length / n] slices hold at most `rows` rows (n divides
  length). Example: batch 4, length 512, rows 1024 -> 2; rows 1000 -> 4; rows 1 -> 512."""
  for n in range(1, length + 1):
    if length % n == 0 and batch * (length // n) <= rows:
      return n
  return length


def _chunked(x, n: int):
  """[B, T, ...] -> [n, B, T/n, ...]: chunk j holds positions j*T/n .. (j+1)*T/n - 1 of every row. Chunking the
  positions, not the rows, keeps each device's batch shard whole in every chunk (T is not sharded)."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, n, t // n, *x.shape[2:]), 1, 0)


def _unchunked(x):
  """Inverse of `_chunked`: [n, B, C, ...] -> [B, n*C, ...]."""
  n, b, c = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


def _chunk(kernel, hidden, targets, weights, with_grads: bool):
  """One chunk: hidden float[B, C, D], targets int[B, C], weights float[B, C] -> (nll_sum, correct) and, with
  grads, d nll_sum / d hidden float[B, C, D] and d nll_sum / d kernel float32[D, V]."""
  rows = hidden.reshape(-1, hidden.shape[-1])
  targets, weights = targets.reshape(-1), weights.reshape(-1).astype(jnp.float32)
  logits = jnp.dot(rows, kernel.astype(rows.dtype), preferred_element_type=jnp.float32)  # [B*C, V]
  lse = jax.nn.logsumexp(logits, axis=-1)
  hit = jnp.arange(logits.shape[-1]) == targets[:, None]
  target_logit = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
  nll = jnp.sum((lse - target_logit) * weights)
  correct = jnp.sum(jnp.where(jnp.argmax(logits, axis=-1) == targets, weights, 0.0))
  if not with_grads:
    return nll, correct
  d_logits = ((jnp.exp(logits - lse[:, None]) - hit) * weights[:, None]).astype(rows.dtype)  # softmax - one-hot
  d_rows = jnp.dot(d_logits, kernel.T.astype(rows.dtype), preferred_element_type=jnp.float32)
  d_kernel = jnp.dot(rows.T, d_logits, preferred_element_type=jnp.float32)
  return nll, correct, d_rows.astype(hidden.dtype).reshape(hidden.shape), d_kernel


def _scan(hidden, kernel, targets, weights, n: int, with_grads: bool):
  """`_chunk` over n chunks of positions: sums nll and hits; with grads, d hidden [B, T, D] and the summed
  d kernel [D, V] (float32)."""
  chunks = (_chunked(hidden, n), _chunked(targets, n), _chunked(weights, n))
  zero = jnp.zeros((), jnp.float32)
  if not with_grads:
    def total(carry, chunk):
      nll, correct = _chunk(kernel, *chunk, False)
      return (carry[0] + nll, carry[1] + correct), None
    return jax.lax.scan(total, (zero, zero), chunks)[0]

  def total_and_grads(carry, chunk):
    nll, correct, d_hidden, d_kernel = _chunk(kernel, *chunk, True)
    return (carry[0] + nll, carry[1] + correct, carry[2] + d_kernel), d_hidden

  (nll, correct, d_kernel), d_hidden = jax.lax.scan(
      total_and_grads, (zero, zero, jnp.zeros(kernel.shape, jnp.float32)), chunks)
  return nll, correct, _unchunked(d_hidden), d_kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_loss(hidden, kernel, targets, weights, n):
  return _scan(hidden, kernel, targets, weights, n, with_grads=False)


def _head_loss_fwd(hidden, kernel, targets, weights, n):
  nll, correct, d_hidden, d_kernel = _scan(hidden, kernel, targets, weights, n, with_grads=True)
  return (nll, correct), (d_hidden, d_kernel.astype(kernel.dtype), targets, weights)


def _head_loss_bwd(n, saved, cotangents):
  d_hidden, d_kernel, targets, weights = saved
  g = cotangents[0]  # `correct` is a count: nothing flows back from it
  return (d_hidden * g.astype(d_hidden.dtype), d_kernel * g.astype(d_kernel.dtype),
          jnp.zeros(targets.shape, jax.dtypes.float0), jnp.zeros_like(weights))


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)


def head_cross_entropy(hidden, kernel, targets, weights, *, chunk_rows: int = 1024):
  """(nll_sum, correct) of the head `hidden @ kernel` against `targets` (module docstring), in chunks of the
  positions axis of at most `chunk_rows` rows (B x positions per chunk; see `chunk_count`).

  Example: the mean next-token loss of logits aligned with tokens int[B, T + 1] is
  `head_cross_entropy(hidden[:, :-1], kernel, tokens[:, 1:], mask)[0] / mask.sum()`.
  """
  n = chunk_count(hidden.shape[0], hidden.shape[1], chunk_rows)
  return _head_loss(hidden, kernel, targets, weights, n)
