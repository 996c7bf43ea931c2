"""LLaMA-2 / TinyLlama decoder; mirrors `Transformer` of LLaMA2-Accessory `accessory/model/LLM/llama.py`, the
language model inside every `llama_ens*` SPHINX (SPHINX.md §2.1).

Letters: B batch, T query length, S key length (the cache length when decoding), L layers, D width, N query
heads, K KV heads, H head dim, F FFN width, V vocab.
In:  tokens int[B, T] or embeddings float[B, T, D] (SPHINX feeds its image-token prefix this way), positions
     int[B, T] (RoPE angle and causal order), segment_ids int[B, T] (0 = padding; packing keeps segments apart).
Out: logits float[B, T, V] (float[B, 1, V] with last_only) and the updated cache (None without one).
KV cache (static shapes; `init_cache`): {"k": [L, B, K, H, S], "v": [L, B, K, S, H] (or lists of L per-layer
arrays, per_layer), "positions", "segments": int[B, S], "index": int32[]}; a call writes its T entries at slots
index..index+T-1, so a prefill of P tokens is followed by single-token steps. Empty slots carry segment 0 and are
masked out.
Not ported: fairscale model parallelism (sharding comes from the logical axes), the original's float mask
argument (masks come from positions and segment ids).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from sphinx_jax import sharding as sh
from sphinx_jax.config import ffn_hidden_dim
from sphinx_jax.errors import SphinxError
from sphinx_jax.models import layers, moe

ACTIVATION_AXES = (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)


def _constrain(x):
  return nn.with_logical_constraint(x, ACTIVATION_AXES)


def _cudnn_attention(q, k, v, mask, implementation="cudnn", cache_layout=False, causal_blocks=1):
  """jax.nn.dot_product_attention (GQA native); mask bool[B, T, S] broadcast over heads. It takes k, v as
  [B, S, K, H] only, so the cache's layout is transposed back (a copy per call; measure on a GPU).
  causal_blocks is XLA's (`layers.causal_query_blocks`); cuDNN skips masked tiles itself."""
  if cache_layout:
    k, v = k.transpose(0, 3, 1, 2), v.transpose(0, 2, 1, 3)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)


def attention_backend(name: str):
  """The attention core named by `config.attention`: (q [B,T,N,H], k, v [B,S,K,H], mask bool[B,T,S],
  cache_layout=False: k [B,K,H,S] and v [B,K,S,H] instead, as `init_cache` holds them; causal_blocks=1: see
  `layers.dot_product_attention`) -> [B,T,N,H]."""
  if name == "xla":
    return layers.dot_product_attention
  if name == "cudnn":
    if jax.default_backend() != "gpu":
      raise SphinxError(f"config.model.llm.attention='cudnn' needs a GPU, but JAX runs on "
                        f"{jax.default_backend()!r}; use 'xla'.")
    return _cudnn_attention
  if name == "splash":
    raise SphinxError("config.model.llm.attention='splash': the Pallas splash backend is not implemented yet; "
                      "use 'xla' (any device) or 'cudnn' (GPU).")
  raise SphinxError(f"config.model.llm.attention={name!r}: unknown backend; use 'xla', 'cudnn' or 'splash'.")


def init_cache(llm, batch: int, length: int, dtype=jnp.float32, per_layer: bool = False):
  """An empty KV cache for `length` positions (prompt + new tokens), every slot invalid (segment 0).

  Heads first, values [B, K, S, H] and keys transposed, [B, K, H, S]: the attention reads each head's block as
  it lies; with [B, S, K, H] XLA CPU copied every layer's whole cache into another layout at each decode step
  (the attention core at config M, batch 8, 256 slots: 4.7 ms -> 0.8 ms per layer). Keys [B, K, H, S] let a
  decode step's q k^T sum over a major axis (`layers._cached_logits`; with [B, K, S, H] keys XLA CPU either
  transposed each layer's K cache per step or, summing over H, ran ~1 ms per layer at config M), and make the
  prefill's q k^T a plain [T, H] x [H, S] product. On TPU both trailing pairs are tiled minor dims.
  per_layer (unscanned decoders only): "k", "v" are lists of L per-layer arrays, so that a decode step
  updates each layer's buffer in place; a stacked [L, ...] buffer is sliced per layer and re-stacked, i.e.
  copied whole, at every step of an unscanned decoder.
  """
  head_dim = llm.dim // llm.n_heads
  shapes = {"k": (batch, llm.n_kv_heads, head_dim, length), "v": (batch, llm.n_kv_heads, length, head_dim)}
  if per_layer:
    buffers = {n: [jnp.zeros(shape, dtype) for _ in range(llm.n_layers)] for n, shape in shapes.items()}
  else:
    buffers = {n: jnp.zeros((llm.n_layers, *shape), dtype) for n, shape in shapes.items()}
  return dict(buffers, positions=jnp.zeros((batch, length), jnp.int32),
              segments=jnp.zeros((batch, length), jnp.int32), index=jnp.zeros((), jnp.int32))


def _write(buffer, values, index, axis=1):
  """Writes values into buffer at slots index..index+T-1 of `axis` (values [B, T] into [B, S]; [B, K, T, H]
  into [B, K, S, H] with axis 2; [B, K, H, T] into [B, K, H, S] with axis 3)."""
  return jax.lax.dynamic_update_slice_in_dim(buffer, values.astype(buffer.dtype), index, axis=axis)


class Attention(nn.Module):
  """Mirrors `Attention`: q/k/v projections, interleaved RoPE, GQA, out projection. float[B,T,D] -> same."""
  config: ml_collections.ConfigDict
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rope, mask, layer_cache, cache_index):
    c = self.config
    b, t, d = x.shape
    h = d // c.n_heads
    proj = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
    q = checkpoint_name(proj(c.n_heads * h, (sh.EMBED, sh.HEADS), "query")(x), "query_proj")
    k = checkpoint_name(proj(c.n_kv_heads * h, (sh.EMBED, sh.KV_HEADS), "key")(x), "key_proj")
    v = checkpoint_name(proj(c.n_kv_heads * h, (sh.EMBED, sh.KV_HEADS), "value")(x), "value_proj")
    q = layers.apply_rope(q.reshape(b, t, c.n_heads, h), rope)
    k = layers.apply_rope(k.reshape(b, t, c.n_kv_heads, h), rope)
    v = v.reshape(b, t, c.n_kv_heads, h)
    new_cache = None
    if layer_cache is not None:  # in the cache's layout (`init_cache`); only the T new entries move
      new_cache = {"k": _write(layer_cache["k"], k.transpose(0, 2, 3, 1), cache_index, axis=3),
                   "v": _write(layer_cache["v"], v.transpose(0, 2, 1, 3), cache_index, axis=2)}
      k, v = new_cache["k"], new_cache["v"]
    if layer_cache is None:  # keys are these queries and the mask is causal by index (`Llama.__call__`)
      # configs saved before `causal_blocks` existed run the whole attention, as they did
      out = attention_backend(c.attention)(q, k, v, mask, causal_blocks=c.get("causal_blocks", 1))
    else:
      out = attention_backend(c.attention)(q, k, v, mask, cache_layout=True)
    return proj(d, (sh.HEADS, sh.EMBED), "out")(out.reshape(b, t, c.n_heads * h)), new_cache


class FeedForward(nn.Module):
  """Mirrors `FeedForward`: down(silu(gate x) * up x), gate = w1, up = w3, down = w2. float[B,T,D] -> same."""
  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    proj = functools.partial(layers.dense, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = checkpoint_name(proj(self.hidden, (sh.EMBED, sh.MLP), "gate")(x), "mlp_gate")
    up = checkpoint_name(proj(self.hidden, (sh.EMBED, sh.MLP), "up")(x), "mlp_up")
    return proj(x.shape[-1], (sh.MLP, sh.EMBED), "down")(jax.nn.silu(gate) * up)


class Block(nn.Module):
  """Mirrors `TransformerBlock`: h = x + attn(norm(x)); out = h + ffn(norm(h)).

  Scan-shaped: (x float[B,T,D], layer_cache {"k","v": [B,K,S,H]} | None, rope (cos, sin) float32[B,T,1,H/2]
  (`layers.rope_tables`), mask bool[B,T,S], cache_index int32[]) -> (out float[B,T,D], new layer_cache | None).
  """
  config: ml_collections.ConfigDict
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, layer_cache, rope, mask, cache_index):
    c = self.config
    norm = functools.partial(layers.RMSNorm, eps=c.norm_eps, param_dtype=self.param_dtype)
    attn, new_cache = Attention(c, self.dtype, self.param_dtype, name="attention")(
        norm(name="attention_norm")(x), rope, mask, layer_cache, cache_index)
    h = _constrain(x + attn)
    if c.moe:  # Mixtral: the sparse expert FFN (models/moe.py) replaces the dense one
      ffn = moe.MoeFeedForward(c.moe.num_experts, c.moe.top_k, ffn_hidden_dim(c), c.moe.dispatch, self.dtype,
                               self.param_dtype, c.moe.get("capacity_factor", 0.0), name="moe")(
                                   norm(name="ffn_norm")(h))
    else:
      ffn = FeedForward(ffn_hidden_dim(c), self.dtype, self.param_dtype, name="mlp")(norm(name="ffn_norm")(h))
    return _constrain(h + ffn), new_cache


class Llama(nn.Module):
  """The decoder: embed -> L blocks -> final RMSNorm -> untied lm_head (no biases anywhere).

  `scan_layers` stacks the blocks' params on a leading [L] axis ('layers/...'); otherwise 'layers_0/...'.
  `embed(tokens)` alone gives float[B, T, D] for callers that build their own input sequence.
  """
  config: ml_collections.ConfigDict
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                          embedding_init=layers.partitioned(nn.initializers.normal(1.0), (sh.VOCAB, sh.EMBED)))
    block = layers.remat_block(Block, c.remat_policy)
    if c.scan_layers:
      # Scan over (layer params, layer cache); the RoPE tables, mask and the write index are shared by every layer.
      # The MoE load-balancing losses are stacked per layer like the params.
      scanned = layers.scan_blocks(block, c.n_layers, in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                                   variable_axes={"params": 0, moe.AUX_COLLECTION: 0})
      self.layers = scanned(c, self.dtype, self.param_dtype)
    else:
      self.layers = [block(c, self.dtype, self.param_dtype) for _ in range(c.n_layers)]
    self.final_norm = layers.RMSNorm(eps=c.norm_eps, param_dtype=self.param_dtype)
    self.lm_head = layers.dense(c.vocab_size, (sh.EMBED, sh.VOCAB), "lm_head", dtype=self.dtype,
                                param_dtype=self.param_dtype)

  def _blocks(self, x, layer_caches, rope, mask, index):
    per_layer = layer_caches is not None and isinstance(layer_caches["k"], list)
    if self.config.scan_layers:
      if per_layer:
        raise SphinxError("Llama: a per-layer KV cache (init_cache per_layer=True) needs scan_layers=False.")
      return self.layers(x, layer_caches, rope, mask, index)
    outs = []
    for i, block in enumerate(self.layers):
      x, out = block(x, None if layer_caches is None else {n: buffers[i] for n, buffers in layer_caches.items()},
                     rope, mask, index)
      outs.append(out)
    if layer_caches is None:
      return x, None
    return x, {n: [o[n] for o in outs] if per_layer else jnp.stack([o[n] for o in outs]) for n in ("k", "v")}

  def __call__(self, tokens=None, *, embeddings=None, positions, segment_ids=None, cache=None, last_only=False,
               return_hidden=False):
    """Args: tokens int[B, T] xor embeddings float[B, T, D]; positions int[B, T]; segment_ids int[B, T] (default
    all 1); cache from `init_cache` or a previous call; last_only: logits of the last position only;
    return_hidden: the final norm's output float[B, T or 1, D] instead of the logits, for a loss that applies
    `lm_head/kernel` itself (models/head_loss.py, which never holds [B, T, V] logits).
    Returns: (logits float[B, T or 1, V] in `dtype` (or the hidden states), updated cache or None).
    """
    if (tokens is None) == (embeddings is None):
      raise SphinxError("Llama: pass exactly one of tokens and embeddings.")
    x = self.embed(tokens) if embeddings is None else embeddings.astype(self.dtype)
    x = _constrain(x)
    if segment_ids is None:
      segment_ids = jnp.ones(positions.shape, jnp.int32)
    if cache is None:
      kv_positions, kv_segments, index, layer_caches = positions, segment_ids, None, None
    else:
      index = cache["index"]
      kv_positions = _write(cache["positions"], positions, index)
      kv_segments = _write(cache["segments"], segment_ids, index)
      layer_caches = {"k": cache["k"], "v": cache["v"]}
    mask = layers.attention_mask(positions, kv_positions, causal=True, q_segments=segment_ids,
                                 kv_segments=kv_segments)
    if cache is None:  # the original's triangular mask: no key after its query, whatever the positions
      mask &= jnp.tri(positions.shape[1], dtype=bool)
    c = self.config
    rope = layers.rope_tables(positions, c.dim // c.n_heads, c.rope_theta, c.rope_scaling,
                              length=2 * c.max_seq_len)
    x, layer_caches = self._blocks(x, layer_caches, rope, mask, index)
    if last_only:
      x = x[:, -1:]
    x = self.final_norm(x)
    out = x if return_hidden and not self.is_initializing() else self.lm_head(x)  # init still creates lm_head
    if cache is None:
      return out, None
    return out, dict(layer_caches, positions=kv_positions, segments=kv_segments,
                     index=index + positions.shape[1])


def _split_leaf(stacked, n_layers: int, consume: bool) -> list:
  """[L, ...] -> L arrays [...]; a leaf sharded over a mesh keeps its spec without the leading axis."""
  sharding = getattr(stacked, "sharding", None)
  if isinstance(sharding, jax.sharding.NamedSharding):
    layer = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    pieces = [jax.device_put(stacked[i], layer) for i in range(n_layers)]
  else:
    pieces = [stacked[i] for i in range(n_layers)]
  if consume and isinstance(stacked, jax.Array):
    jax.block_until_ready(pieces)
    stacked.delete()
  return pieces


def unstack_layers(params, n_layers: int, consume: bool = False):
  """Scanned tree ('layers/...' with a leading [L] axis) -> unscanned ('layers_0/...', ...), same values.

  Decoding often runs faster unscanned: a scan slices every layer's weights out of the stack each step.
  consume: delete each stacked device array once it is split, so that the peak holds one extra leaf rather
  than a second copy of the decoder (only for a tree nobody else holds, e.g. one just restored).
  """
  leaves, treedef = jax.tree.flatten(params["layers"])
  split = [_split_leaf(leaf, n_layers, consume) for leaf in leaves]
  out = {k: v for k, v in params.items() if k != "layers"}
  out.update({f"layers_{i}": jax.tree.unflatten(treedef, [pieces[i] for pieces in split]) for i in range(n_layers)})
  return out


def stack_layers(params, n_layers: int):
  """Inverse of `unstack_layers`."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *(params[f"layers_{i}"] for i in range(n_layers)))
  return out
