"""Analytic FLOPs per training step, for MFU (DESIGN.md "Performance method") and `sphinx-jax compile`.

Counted from the config (matmuls and convolutions only, 2 FLOPs per multiply-add; norms, activations and the
embedding gather are left out). One train step over `rows` sequences of `seq_len` decoder positions
(T = rows x seq_len, every position computed, padded or not):
  decoder     3 x 2 T (L (2 D N H + 2 D K H + 3 D F) + D V)      forward + backward of the projections, lm_head
              3 x rows x L x 2 D S^2                              causal attention: q k^T and p v over S^2 / 2
  fusion      2 x 2 x (tokens x C x D)                            forward + weight gradient only: the towers'
                                                                  outputs are under stop_gradient
  towers      forward only, per view x views x rows:
    ViT       2 P (p^2 3) W + depth x 2 L (4 W^2 + 2 L W + mlp)   mlp = 2 W F (GELU) or 3 W F (fused SwiGLU)
    ConvNeXt  stem 2 h0^2 48 C0, downsample 2 h^2 4 C_in C_out,   h = input_size / 4 / 2^stage
              block 2 h^2 (49 C + 8 C^2)
    Q-Former  per layer 2 Q (4 D^2 + 2 Q D + 2 D F), cross-attention layers 2 (2 Q D^2 + 2 S E D + 2 Q S D)
MoE decoders count top_k experts per token plus the router. `cost_analysis()` is not used: it counts a
scanned layer body once.
"""
from __future__ import annotations

from sphinx_jax.config import ffn_hidden_dim, patch_grid

def vit_flops(width: int, depth: int, mlp_dim: int, patch: int, image_size: int, swiglu: bool = False) -> float:
  """Forward FLOPs of one image through a ViT (class token + (image_size / patch)^2 patches)."""
  patches = (image_size // patch) ** 2
  tokens = patches + 1
  mlp = (3 if swiglu else 2) * width * mlp_dim
  per_layer = 2 * tokens * (4 * width * width + 2 * tokens * width + mlp)
  return 2.0 * patches * patch * patch * 3 * width + depth * per_layer


def convnext_flops(depths, dims, input_size: int) -> float:
  """Forward FLOPs of one image through the ConvNeXt trunk (stem 4x4/4, downsample 2x2/2, 7x7 depthwise)."""
  side = input_size // 4
  total = 2.0 * side * side * 4 * 4 * 3 * dims[0]
  for stage, (depth, width) in enumerate(zip(depths, dims)):
    if stage:
      side //= 2
      total += 2.0 * side * side * 2 * 2 * dims[stage - 1] * width
    total += depth * 2.0 * side * side * (49 * width + 8 * width * width)
  return total


def qformer_flops(qformer, queries: int, image_tokens: int, image_width: int) -> float:
  """Forward FLOPs of the Q-Former's query branch reading `image_tokens` x `image_width` image features."""
  d, q, s = qformer.hidden, queries, image_tokens
  per_layer = 2.0 * q * (4 * d * d + 2 * q * d + 2 * d * qformer.intermediate)
  cross = 2.0 * (2 * q * d * d + 2 * s * image_width * d + 2 * q * s * d)
  cross_layers = (qformer.layers + qformer.cross_attention_frequency - 1) // qformer.cross_attention_frequency
  return qformer.layers * per_layer + cross_layers * cross


def tower_flops(model_config) -> float:
  """Forward FLOPs of the towers in use on one view."""
  m, total = model_config, 0.0
  if "clip" in m.towers:
    c = m.clip
    total += vit_flops(c.width, c.layers, c.mlp_dim, c.patch, c.image_size)
  if "convnext" in m.towers:
    total += convnext_flops(m.convnext.depths, m.convnext.dims, m.convnext.input_size)
  if "dinov2" in m.towers:
    c = m.dinov2
    total += vit_flops(c.width, c.depth, c.mlp_hidden, c.patch, c.image_size, swiglu=True)
  if "qformer" in m.towers:
    v = m.qformer.vision
    total += vit_flops(v.width, v.layers, v.mlp_dim, v.patch, v.image_size)
    total += qformer_flops(m.qformer.qformer, m.qformer.num_query_tokens, (v.image_size // v.patch) ** 2 + 1,
                           v.width)
  return total


def fused_channels(model_config) -> int:
  """C: channels of the [CLIP | ConvNeXt | DINOv2] concat that fusion/visual_proj reads."""
  m = model_config
  widths = {"clip": lambda: m.clip.width, "convnext": lambda: m.convnext.dims[-1], "dinov2": lambda: m.dinov2.width}
  return sum(widths[t]() for t in ("clip", "convnext", "dinov2") if t in m.towers)


def fusion_flops(model_config) -> float:
  """Forward FLOPs of the projections on one view: visual_proj on the class + grid tokens (257 in SPHINX),
  qformer_proj on the queries."""
  m = model_config
  total = 2.0 * (1 + patch_grid(m) ** 2) * fused_channels(m) * m.llm.dim
  if "qformer" in m.towers:
    total += 2.0 * m.qformer.num_query_tokens * m.qformer.qformer.hidden * m.llm.dim
  return total


def decoder_matmul_params(llm) -> int:
  """Weights a token multiplies with in the decoder: per layer q/k/v/out and the FFN (top_k experts plus the
  router for MoE), and the lm_head; the embedding table is a gather and the norms are elementwise."""
  head = llm.dim // llm.n_heads
  attention = 2 * llm.dim * llm.n_heads * head + 2 * llm.dim * llm.n_kv_heads * head
  ffn = 3 * llm.dim * ffn_hidden_dim(llm)
  if llm.get("moe"):
    ffn = llm.moe.top_k * ffn + llm.dim * llm.moe.num_experts
  return llm.n_layers * (attention + ffn) + llm.dim * llm.vocab_size


def step_flops(model_config, rows: int, seq_len: int, with_images: bool = True) -> float:
  """FLOPs of one train step over `rows` sequences of `seq_len` decoder positions (image positions included);
  `with_images` False for a text-only batch, which runs no tower."""
  llm = model_config.llm
  tokens = rows * seq_len
  decoder = 6.0 * decoder_matmul_params(llm) * tokens + 6.0 * llm.n_layers * llm.dim * seq_len * tokens
  if not (model_config.towers and with_images):
    return decoder
  views = model_config.views * rows
  return decoder + views * (2.0 * fusion_flops(model_config) + tower_flops(model_config))
