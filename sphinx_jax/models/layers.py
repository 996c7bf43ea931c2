"""Shared primitives of the decoder and the towers: projections with logical axes, norms with the
original's epsilons and precision, activations, RoPE (Meta interleaved) and the attention core.

Letters: B batch, T query length, S key length, N query heads, K KV heads, G = N/K, H head dim, D width.
Nothing here names a mesh axis; weights carry logical names from `sphinx_jax.sharding`.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from sphinx_jax import sharding as sh


def dtype_of(name_or_dtype):
  """'bfloat16' / 'float32' / a dtype -> a jnp dtype (configs store names)."""
  return jnp.dtype(name_or_dtype)


def partitioned(init, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(axes))


def rows_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's product (lhs's last axis with rhs's first) on lhs flattened to rows: float[..., I] x [I, O] ->
  float[..., O].

  Why rows: on [B, T, I] the weight gradient contracts two axes (B and T) at once, and XLA CPU then copies the
  output gradient into a transposed layout before every weight-gradient matmul (the [B*T, 32000] logits
  gradient included); on [B*T, I] it is one plain matmul (an MLP's fwd+bwd at [4, 512, 1024 -> 2816] ran 1.2x
  faster). Merging leading axes is a free reshape, so other backends see the same product.
  """
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
    raise ValueError(f"rows_dot_general contracts lhs's last axis with rhs's first, not {dimension_numbers}")
  rows = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type)
  return rows.reshape(*lhs.shape[:-1], rhs.shape[-1])


def dense(features, axes, name, *, use_bias=False, bias_axes=None, dtype=jnp.float32, param_dtype=jnp.float32,
          kernel_init=nn.initializers.lecun_normal()):
  """nn.Dense whose kernel [in, out] carries logical axes `axes` (bias: `bias_axes`, default axes[-1:]); the
  product runs on rows (`rows_dot_general`)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=partitioned(kernel_init, axes),
                  bias_init=partitioned(nn.initializers.zeros_init(), bias_axes or axes[-1:]),
                  dot_general=rows_dot_general)


def layer_norm(eps, name, axis_name=None, *, dtype=jnp.float32, param_dtype=jnp.float32):
  """LayerNorm as torch computes it: two-pass variance (flax's default fast variance differs), given eps."""
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=partitioned(nn.initializers.ones_init(), (axis_name,)),
                      bias_init=partitioned(nn.initializers.zeros_init(), (axis_name,)))


class RMSNorm(nn.Module):
  """Mirrors accessory RMSNorm: x * rsqrt(mean(x^2) + eps) in fp32, cast back to x's dtype, times weight."""
  eps: float = 1e-5
  axis_name: str | None = sh.EMBED
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", partitioned(nn.initializers.ones_init(), (self.axis_name,)),
                        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
    return normed * weight.astype(x.dtype)


def gelu_exact(x):
  """torch.nn.GELU() (erf form); jax's default is the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x):
  """OpenAI CLIP's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": gelu_exact, "quick_gelu": quick_gelu, "silu": jax.nn.silu}


def rope_frequencies(head_dim: int, theta: float):
  """float32[H/2]: theta^(-2i/H), the Meta/accessory table computed in fp32."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32)[: head_dim // 2] / head_dim))


def rope_tables(positions, head_dim: int, theta: float, scaling: float | None = None, *, length: int):
  """(cos, sin) float32[B, T, 1, H/2]: rows `positions` of cos / sin(p * freq_i) for p in [0, length), the
  original's `precompute_freqs_cis` table (its length is 2 * max_seq_len), in fp32; NaN rows past its end, where
  the original fails to index.

  Accessory's `rope_scaling` multiplies positions (`t = t * scaling` in precompute_freqs_cis); None = 1.
  Hugging Face's linear rope scaling divides them instead, so its factor is 1 / scaling.
  Why rows of a table: computed from the positions directly, XLA CPU fused the cosine and sine into every
  consumer (each layer's q and k rotations and their gradients) and recomputed them per element there, 8
  fusions of ~1.1-1.5 ms in the demo's step. A gather does not fuse that way, so each table is computed once per
  forward pass ([length, H/2]: 8192 x 64 for SPHINX-13B), and the angles are the same float32 products as before.
  A single position per row (a decoding step) takes its angles directly instead.
  """
  scaled = (lambda p: p) if scaling is None else (lambda p: p * scaling)
  freqs = rope_frequencies(head_dim, theta)
  if positions.shape[1] == 1:
    # One new token per step (decoding): its B x H/2 angles, even if recomputed in each layer's q and k rotation,
    # cost far less than the table would per token.
    angles = scaled(positions.astype(jnp.float32))[..., None] * freqs
    angles = jnp.where((positions < length)[..., None], angles, jnp.nan)
    return jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  angles = scaled(jnp.arange(length, dtype=jnp.float32))[:, None] * freqs
  rows = lambda table: jnp.take(table, positions, axis=0, mode="fill", fill_value=jnp.nan)[:, :, None]
  return rows(jnp.cos(angles)), rows(jnp.sin(angles))


def apply_rope(x, rope):
  """Meta interleaved RoPE: pairs (x[2i], x[2i+1]) rotated by the angles of `rope` (`rope_tables`), in fp32.

  Args: x float[B, T, N, H], rope (cos, sin) float32[B, T, 1, H/2]. Returns: x's dtype [B, T, N, H].
  """
  cos, sin = rope
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  real, imag = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def attention_mask(q_positions, kv_positions, *, causal=True, kv_valid=None, q_segments=None, kv_segments=None):
  """bool[B, T, S]: which keys each query may see.

  causal: key position <= query position. kv_valid bool[B, S] drops empty cache slots / padding.
  Segment ids (packing) keep attention inside a segment; 0 means padding.
  Example (T=S=3, causal, no segments): [[1,0,0],[1,1,0],[1,1,1]].
  """
  mask = jnp.ones((q_positions.shape[0], q_positions.shape[1], kv_positions.shape[1]), bool)
  if causal:
    mask &= kv_positions[:, None, :] <= q_positions[:, :, None]
  if kv_valid is not None:
    mask &= kv_valid[:, None, :]
  if q_segments is not None:
    mask &= (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] > 0)
  return mask


def dot_product_attention(q, k, v, mask=None, *, scale=None, cache_layout=False, causal_blocks=1):
  """softmax(q k^T * scale) v with GQA by repeat-interleave (KV head j serves query heads jG..jG+G-1).

  The plain XLA backend, the reference the accelerator backends are checked against. Logits and softmax in
  fp32. Args: q [B, T, N, H], k and v [B, S, K, H] (with cache_layout, the KV cache's layout of
  models/llama.py `init_cache`: k [B, K, H, S], v [B, K, S, H]), mask bool broadcastable to [B, T, S] (or
  [B, N, T, S]). causal_blocks > 1 promises that the mask hides every key after its query (keys are the
  queries, S = T): the queries then run in that many row blocks, each against the keys up to its last row
  (`causal_query_blocks`). Returns: [B, T, N, H] in q's dtype.
  """
  b, t, n, h = q.shape
  scale = h ** -0.5 if scale is None else scale
  if causal_blocks > 1 and mask is not None and not cache_layout and t == k.shape[1] and t >= causal_blocks:
    return causal_query_blocks(q, k, v, mask, scale, causal_blocks)
  kv_heads = k.shape[1 if cache_layout else 2]
  groups = n // kv_heads
  qg = q.reshape(b, t, kv_heads, groups, h)
  mask = None if mask is None else _grouped_mask(mask, kv_heads, groups)
  if t > 1 or cache_layout:
    # Heads first, contracted axis last: XLA CPU then runs plain batched matmuls (the same contractions with the
    # heads in the middle ran 1.5-2x slower at training and prefill shapes, and a decode step copied the whole
    # cache into this layout first); TPU's layout pass is indifferent.
    qg = qg.transpose(0, 2, 3, 1, 4)
    if not cache_layout:
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if cache_layout and t == 1:
      out = _cached_values(_masked(_cached_logits(qg, k) * scale, mask), v)
    else:
      out = _softmax_attention(qg, k, v, mask, scale, ("BKGTH", "BKHS" if cache_layout else "BKSH", "BKSH"))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  # one query, keys [B, S, K, H]: contract them where they lie; a transpose would copy all of them
  return _softmax_attention(qg, k, v, mask, scale, ("BTKGH", "BSKH", "BSKH")).reshape(b, t, n, h)


def causal_query_blocks(q, k, v, mask, scale, blocks: int):
  """`dot_product_attention` under a mask that hides every later key, in `blocks` row blocks of the queries, block
  [a, e) against keys [0, e): the keys past e are masked for all its rows, so leaving them out changes no valid
  row (a row whose mask is all False, padding, averages fewer values). With 4 blocks ~3/8 of the logits are never
  computed, on any device (what flash / splash attention skip as fully masked tiles); at the demo's [8, 256, 4 x 32]
  fwd+bwd ran ~2x faster on XLA CPU, at config M's [4, 512, 16 x 64] 1.2-1.7x. Same args as there (scale set);
  the heads-first transposes happen once, outside the blocks."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  groups = n // kv_heads
  qg = q.reshape(b, t, kv_heads, groups, h).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  mask = _grouped_mask(jnp.broadcast_to(mask, mask.shape[:-2] + (t, t)), kv_heads, groups)
  edges = [round(t * i / blocks) for i in range(blocks + 1)]
  out = jnp.concatenate([_softmax_attention(qg[:, :, :, a:e], k[:, :, :e], v[:, :, :e], mask[..., a:e, :e], scale,
                                            ("BKGTH", "BKSH", "BKSH"))
                         for a, e in zip(edges, edges[1:])], axis=3)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _grouped_mask(mask, kv_heads: int, groups: int):
  """A mask broadcastable to [B, T, S] or [B, N, T, S] -> broadcastable to [B, K, G, T, S]."""
  if mask.ndim == 3:
    return mask[:, None, None]
  if mask.shape[1] == kv_heads * groups:
    return mask.reshape(mask.shape[0], kv_heads, groups, *mask.shape[2:])
  return mask[:, :, None]


def _masked(logits, mask):
  return logits if mask is None else jnp.where(mask, logits, jnp.finfo(jnp.float32).min)


def _softmax_attention(qg, k, v, mask, scale, specs):
  """softmax(masked q k^T * scale) v for several queries: qg, k, v laid out as `specs` (q, k, v einsum specs over
  B, K, G, T, S, H), mask broadcastable to [B, K, G, T, S] or None -> laid out as the q spec, in v's dtype."""
  q_spec, k_spec, v_spec = specs
  logits = jnp.einsum(f"{q_spec},{k_spec}->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
  return _attend(_masked(logits, mask), v, v_spec, q_spec)


# A decode step's attention against the KV cache (one query) multiplies and sums over the cache in fusions instead
# of dots. As dots inside the generation loop, XLA CPU either copied each layer's K cache into another layout at
# every step ([B, K, S, H] keys) or duplicated each layer's in-place cache update into a copy of the whole buffer
# (the dot reads the updated cache through a reshape); at bench/decoder.py's config M, batch 1, that was ~32 MB
# of copies per step, and the step (random weights) ran 27.1 -> 22.3 ms without them. Keys are stored [B, K, H, S]
# so that both sums run over a major axis, vectorised along the minor one (a sum over H as the minor axis cost ~1 ms
# per layer).
# On TPU these are memory-bound VPU reductions over the same bytes as the batched matvec (not measured there).
def _cached_logits(qg, k):
  """q k^T for one query: qg [B, K, G, 1, H], k [B, K, H, S] -> float32[B, K, G, 1, S]."""
  return jnp.sum(qg[..., None].astype(jnp.float32) * k[:, :, None, None].astype(jnp.float32), axis=-2)


def _cached_values(logits, v):
  """softmax(logits) v for one query: logits float32[B, K, G, 1, S], v [B, K, S, H] -> [B, K, G, 1, H], v's
  dtype (summed in float32, as the dot accumulates)."""
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.sum(probs[..., None] * v[:, :, None, None].astype(jnp.float32), axis=-2).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _attend(logits, v, kv_spec, out_spec):
  """softmax(logits) v: logits float32[B, K, G, T, S], v laid out as `kv_spec` -> `out_spec`, in v's dtype.

  The backward needs sum_s dP * P per query, which equals dO . O (P sums the rows of V into O): a reduction over
  the head dim H instead of the keys S, from tensors already at hand, so no [.., T, S] reduction or recomputed
  softmax runs (as flash attention's backward does it). Attention fwd+bwd at [4, 512, 16 x 64] on XLA CPU: 1.2x.
  """
  return _attend_fwd(logits, v, kv_spec, out_spec)[0]


def _attend_fwd(logits, v, kv_spec, out_spec):
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"BKGTS,{kv_spec}->{out_spec}", probs, v)
  return out, (probs, v, out)


def _attend_bwd(kv_spec, out_spec, saved, d_out):
  probs, v, out = saved
  d_v = jnp.einsum(f"BKGTS,{out_spec}->{kv_spec}", probs, d_out)
  d_probs = jnp.einsum(f"{out_spec},{kv_spec}->BKGTS", d_out, v, preferred_element_type=jnp.float32)
  row = jnp.einsum(f"{out_spec},{out_spec}->BKGT", d_out.astype(jnp.float32), out.astype(jnp.float32))
  return probs.astype(jnp.float32) * (d_probs - row[..., None]), d_v


_attend.defvjp(_attend_fwd, _attend_bwd)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    # Also keeps the two [B, T, F] MLP projections (gate, up): the backward then recomputes no matmul of the
    # MLP, at the price of the widest activations.
    "save_qkv_mlp": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj",
                                                                  "mlp_gate", "mlp_up"),
}


def remat_block(block_cls, policy_name: str, static_argnums=()):
  """Wraps a linen block class in nn.remat with a named policy ('none' returns the class unchanged)."""
  if policy_name == "none":
    return block_cls
  return nn.remat(block_cls, policy=REMAT_POLICIES[policy_name], prevent_cse=True,
                  static_argnums=static_argnums)


def scan_blocks(block_cls, length: int, *, in_axes=(), variable_axes=None):
  """nn.scan over `length` identical blocks, params stacked on a leading logical 'layers' axis."""
  return nn.scan(block_cls, variable_axes=variable_axes or {"params": 0}, split_rngs={"params": True},
                 in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: sh.LAYERS})


