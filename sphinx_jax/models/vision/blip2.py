"""SPHINX's BLIP-2 branch (`llma.qformer`): EVA ViT-g on the 224 view, then the Q-Former reading it with the 32
learned query tokens. Mirrors transformers 4.57 `Blip2Model.get_qformer_features(pixel_values)
.last_hidden_state` with the language model removed (SPHINX.md §3.4); the image mask is all ones.

Letters: B batch, Q queries (32), D Q-Former width (768), S image tokens (257), E EVA width (1408).
In: float[B, 224, 224, 3] NHWC, CLIP-normalised. Out: float[B, Q, D], plus {"image": float[B, S, E]}, the EVA
output the Q-Former cross-attends to.
Parameter tree: vision/… (models/vision/eva.py), query_tokens [Q, D], qformer/… (models/vision/qformer.py).
`config` is sphinx_jax.config.qformer_config().
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sphinx_jax import sharding as sh
from sphinx_jax.models import layers
from sphinx_jax.models.vision.eva import EvaVit
from sphinx_jax.models.vision.qformer import QFormer


class Blip2(nn.Module):
  """dtype: compute dtype (bf16 for the frozen tower, fp32 for parity); frozen: stop gradients at the output."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  frozen: bool = False

  @nn.compact
  def __call__(self, images):
    c = self.config
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    image, _ = EvaVit(c, name="vision", **types)(images)
    queries = self.param("query_tokens", layers.partitioned(nn.initializers.normal(0.02), (None, sh.VIT_EMBED)),
                         (c.num_query_tokens, c.qformer.hidden), self.param_dtype)
    queries = jnp.broadcast_to(queries, (images.shape[0], *queries.shape))
    out = QFormer(c, name="qformer", **types)(queries, image)
    if self.frozen:
      out = jax.lax.stop_gradient(out)
    return out, {"image": image}
