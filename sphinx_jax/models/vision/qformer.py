"""BLIP-2 Q-Former, query branch only; mirrors transformers 4.57 `Blip2QFormerModel` (BERT-style, post-norm).

Every `cross_attention_frequency`-th layer (0, 2, 4, ... at frequency 2) also cross-attends to the image tokens.
Per layer: x = LN(x + out(self_attn(x))); [x = LN(x + out(cross_attn(x, image)))]; x = LN(x + down(gelu(up x))).
The queries first pass `layernorm` (eps 1e-12 everywhere). No masks: SPHINX passes all-ones masks, and the text
branch (`intermediate` / `output`) does not exist in its checkpoints.

Letters: B batch, Q queries (32), D width 768, S image tokens (257), E image width (1408), N heads 12, H head dim
64, F intermediate 3072. In: queries float[B, Q, D], image float[B, S, E]. Out: float[B, Q, D].
`config` is the BLIP-2 config (sphinx_jax.config.qformer_config()): numbers from `.qformer`, layout from `.scan`.
Parameter tree: layernorm, then unscanned `layers_{i}/…` or, scanned, `groups/layer_{j}/…` with a leading
[layers / frequency] axis (a group is `frequency` consecutive layers, the first with cross-attention, so the
groups are uniform). Layer: self_attn/{query, key, value, out, norm}, cross_attn/… (first of a group), mlp_up,
mlp_down, mlp_norm; attention kernels keep their head axes: query/key/value [D or E, N, H], out [N, H, D].
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sphinx_jax import sharding as sh
from sphinx_jax.errors import SphinxError
from sphinx_jax.models import layers
from sphinx_jax.models.vision.vit import Einsum

# Order: Attention -> Layer -> Group -> QFormer.


class Attention(nn.Module):
  """BERT attention + its output block: LN(x + out(softmax(q k^T / sqrt(H)) v)), keys/values from `context`.

  x float[B, Q, D], context float[B, S, E] (x itself for self-attention) -> float[B, Q, D].
  """
  heads: int
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    width, source = x.shape[-1], context.shape[-1]
    if width % self.heads:
      raise SphinxError(f"Q-Former: {self.heads} heads do not divide width {width}; fix config.qformer.")
    n, h = self.heads, width // self.heads
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    project = lambda name, d: Einsum("BLD,DNH->BLNH", (d, n, h), (sh.VIT_EMBED, sh.VIT_HEADS, sh.HEAD_DIM),
                                     name=name, **types)
    q = project("query", width)(x)
    k = project("key", source)(context)
    v = project("value", source)(context)
    y = layers.dot_product_attention(q, k, v)
    y = Einsum("BLNH,NHD->BLD", (n, h, width), (sh.VIT_HEADS, sh.HEAD_DIM, sh.VIT_EMBED), name="out", **types)(y)
    return layers.layer_norm(self.eps, "norm", sh.VIT_EMBED, **types)(y + x)


class Layer(nn.Module):
  """One Q-Former layer (query branch). x float[B, Q, D], image float[B, S, E] -> float[B, Q, D]."""
  heads: int
  intermediate: int
  eps: float
  cross: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, image):
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Attention(self.heads, self.eps, name="self_attn", **types)(x, x)
    if self.cross:
      x = Attention(self.heads, self.eps, name="cross_attn", **types)(x, image.astype(self.dtype))
    kw = dict(use_bias=True, **types)
    y = layers.dense(self.intermediate, (sh.VIT_EMBED, sh.VIT_MLP), "mlp_up", **kw)(x)
    y = layers.dense(x.shape[-1], (sh.VIT_MLP, sh.VIT_EMBED), "mlp_down", **kw)(layers.gelu_exact(y))
    return layers.layer_norm(self.eps, "mlp_norm", sh.VIT_EMBED, **types)(y + x)


class Group(nn.Module):
  """`frequency` consecutive layers, the first with cross-attention; (x, image) -> (x, None) for nn.scan."""
  frequency: int
  heads: int
  intermediate: int
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, image):
    for j in range(self.frequency):
      x = Layer(self.heads, self.intermediate, self.eps, j == 0, name=f"layer_{j}", dtype=self.dtype,
                param_dtype=self.param_dtype)(x, image)
    return nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)), None


class QFormer(nn.Module):
  """`config`: sphinx_jax.config.qformer_config() (reads `.qformer` and `.scan`). See the module docstring."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, image):
    c = self.config.qformer
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.layer_norm(c.eps, "layernorm", sh.VIT_EMBED, **types)(queries.astype(self.dtype))
    shape = dict(heads=c.heads, intermediate=c.intermediate, eps=c.eps, **types)
    if self.config.scan:
      if c.layers % c.cross_attention_frequency:
        raise SphinxError(f"config.qformer: {c.layers} layers are not whole groups of cross_attention_frequency "
                          f"{c.cross_attention_frequency}, so they cannot be scanned; set config.scan=False.")
      groups = c.layers // c.cross_attention_frequency
      scanned = layers.scan_blocks(Group, groups, in_axes=(nn.broadcast,))
      x, _ = scanned(c.cross_attention_frequency, name="groups", **shape)(x, image)
    else:
      for i in range(c.layers):
        x = Layer(cross=i % c.cross_attention_frequency == 0, name=f"layers_{i}", **shape)(x, image)
    return x
