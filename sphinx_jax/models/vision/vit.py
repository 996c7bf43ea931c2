"""The ViT shared by SPHINX's three transformer towers: patch embedding, class token, learned positions,
pre-norm blocks with fused-qkv attention, a GELU MLP or a fused SwiGLU, optional LayerScale, final LayerNorm.

Mirrors, with one configurable block:
  open_clip `VisionTransformer` / `ResidualAttentionBlock` (CLIP ViT-L/14: no conv bias, ln_pre, GELU or QuickGELU),
  dinov2 `DinoVisionTransformer` / `NestedTensorBlock` + `SwiGLUFFNFused` + `LayerScale` (DINOv2 ViT-g/14),
  transformers `Blip2VisionModel` / `Blip2EncoderLayer` (BLIP-2's EVA ViT-g: no pre-norm).
What differs between them is data (`Arch`), set by the tower classes in clip.py, dinov2.py and eva.py.

Letters: B batch, L tokens (1 class + P patches), D width, N heads, H head dim, F MLP width,
C the stacked q/k/v (3) or SwiGLU halves (2).
In: float[B, S, S, 3] (S = image_size, NHWC, CLIP-normalised). Out: float[B, L, D], final LayerNorm on all tokens,
plus {"stem": tokens entering the blocks, "encoded": tokens leaving them} (no extra compute).
Parameter tree: patch_embed/{kernel [p, p, 3, D], bias}, class_embedding [D], position_embedding [L, D],
pre_norm (CLIP), blocks/… (scanned, leading [depth]) or blocks_{i}/…, post_norm.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sphinx_jax import sharding as sh
from sphinx_jax.data.image import CLIP_MEAN, CLIP_STD  # every tower's input statistics (SPHINX.md §3.1)
from sphinx_jax.errors import SphinxError
from sphinx_jax.models import layers

# Order: Arch/Spec -> Einsum, Attention, Mlp, SwiGLU -> Block -> VisionTransformer.


@dataclasses.dataclass(frozen=True)
class Arch:
  """What one tower family fixes (the original's code, not its config)."""
  patch_bias: bool          # conv patch embedding with bias (DINOv2, EVA) or without (CLIP)
  pre_norm: bool            # LayerNorm on the tokens before the blocks (CLIP's ln_pre)
  layer_scale: bool         # per-channel gamma on both residual branches (DINOv2's ls1/ls2)
  input_stats: tuple | None = None  # (mean, std) the tower re-normalises CLIP-normalised input to (DINOv2)


@dataclasses.dataclass(frozen=True)
class Spec:
  """The numbers of one tower, read from its config by the tower class."""
  width: int
  depth: int
  heads: int
  mlp_dim: int
  mlp: str                  # 'gelu' | 'quick_gelu' (fc1 -> act -> fc2) or 'swiglu' (fused w12 -> silu*x -> w3)
  patch: int
  image_size: int
  eps: float
  scan: bool


def sincos_positions(key, shape, dtype=jnp.float32):
  """Init of the [1 + g*g, D] position table: a zero class row, then per cell sin/cos of its row and its column
  index at D/4 geometric frequencies (1 down to 1/10000), as MAE and big_vision's `sincos2d` embed ViT positions.

  Why not the usual normal(0.02): a released tower's learned positions are what lets the decoder localise
  (REC, grounding); random positions 50x below the patch embedding's scale are invisible after the first
  LayerNorm, so a randomly initialised tower (the demo's, trained or frozen) would be position-blind.
  Released checkpoints overwrite the table; `key` is unused (the table is deterministic).
  """
  del key
  tokens, width = shape
  grid = math.isqrt(tokens - 1)
  if grid * grid != tokens - 1 or width % 4:
    raise SphinxError(f"vit position table {shape}: needs 1 + a square number of rows and a width divisible by 4.")
  freqs = 1.0 / 10000.0 ** (jnp.arange(width // 4) / (width // 4))
  rows, cols = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing="ij")
  angles = [axis.reshape(-1, 1).astype(jnp.float32) * freqs for axis in (rows, cols)]
  cells = jnp.concatenate([f(a) for a in angles for f in (jnp.sin, jnp.cos)], axis=1)
  return jnp.concatenate([jnp.zeros((1, width)), cells], axis=0).astype(dtype)


def renormalise(images, stats):
  """CLIP-normalised -> normalised with `stats` = (mean, std), as llama_ens.py computes it for DINOv2.

  (x * std_clip + mean_clip - mean) / std, left to right, with the constants cast to the image dtype first
  (torch's `.to(image)`), so bf16 images round like the original. images float[B, S, S, 3] -> same.
  """
  mean, std = stats
  const = lambda v: jnp.asarray(v, jnp.float32).astype(images.dtype)
  return (images * const(CLIP_STD) + const(CLIP_MEAN) - const(mean)) / const(std)


class Einsum(nn.Module):
  """y = einsum(spec, x, kernel) + bias: a Linear whose kernel keeps the axes a fused torch Linear flattens.

  `spec` is "<x letters>,<kernel letters>-><y letters>", e.g. "BLD,DCNH->BLCNH" (fused qkv) or
  "BLNH,NHD->BLD" (attention output). Kernel letters shared with x are contracted (they set fan-in); the
  others are the output's trailing axes, and the bias has exactly those. Computed in `dtype`.
  """
  spec: str
  kernel_shape: tuple
  kernel_axes: tuple
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x_letters, rest = self.spec.split(",")
    k_letters = rest.split("->")[0]
    contracted = [c in x_letters for c in k_letters]
    fan_in = math.prod(d for d, c in zip(self.kernel_shape, contracted) if c)
    kernel = self.param("kernel", layers.partitioned(nn.initializers.normal(fan_in ** -0.5), self.kernel_axes),
                        self.kernel_shape, self.param_dtype)
    bias_shape = tuple(d for d, c in zip(self.kernel_shape, contracted) if not c)
    bias_axes = tuple(a for a, c in zip(self.kernel_axes, contracted) if not c)
    bias = self.param("bias", layers.partitioned(nn.initializers.zeros_init(), bias_axes), bias_shape,
                      self.param_dtype)
    return jnp.einsum(self.spec, x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class Attention(nn.Module):
  """Self-attention over all tokens (no mask) with one fused q/k/v projection and an output projection.

  The torch weights (CLIP `in_proj_weight`, DINOv2 `qkv`, BLIP-2 `qkv`) stack [q; k; v] rows, heads contiguous
  in each; here the kernel keeps those axes: qkv [D, 3, N, H], out [N, H, D]. x float[B, L, D] -> same.
  """
  heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.heads:
      raise SphinxError(f"vision tower: {self.heads} heads do not divide width {width}; fix the tower config.")
    n, h = self.heads, width // self.heads
    qkv = Einsum("BLD,DCNH->BLCNH", (width, 3, n, h), (sh.VIT_EMBED, None, sh.VIT_HEADS, sh.HEAD_DIM),
                 self.dtype, self.param_dtype, name="qkv")(x)
    out = layers.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return Einsum("BLNH,NHD->BLD", (n, h, width), (sh.VIT_HEADS, sh.HEAD_DIM, sh.VIT_EMBED),
                  self.dtype, self.param_dtype, name="out")(out)


class Mlp(nn.Module):
  """down(act(up x)): CLIP c_fc/c_proj, BLIP-2 fc1/fc2. x float[B, L, D] -> same; hidden [B, L, F]."""
  hidden: int
  act: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(self.hidden, (sh.VIT_EMBED, sh.VIT_MLP), "up", **kw)(x)
    return layers.dense(x.shape[-1], (sh.VIT_MLP, sh.VIT_EMBED), "down", **kw)(layers.ACTIVATIONS[self.act](h))


class SwiGLU(nn.Module):
  """down(silu(gate) * up) with gate/up from one fused projection, as DINOv2's SwiGLUFFNFused.

  Its `w12` output splits in halves (first -> silu, second -> linear); the kernel here is [D, 2, F] so the two
  halves stay whole when F is sharded. x float[B, L, D] -> same.
  """
  hidden: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = Einsum("BLD,DCF->BLCF", (width, 2, self.hidden), (sh.VIT_EMBED, None, sh.VIT_MLP),
               self.dtype, self.param_dtype, name="gate_up")(x)
    h = jax.nn.silu(h[:, :, 0]) * h[:, :, 1]
    return layers.dense(width, (sh.VIT_MLP, sh.VIT_EMBED), "down", use_bias=True, dtype=self.dtype,
                        param_dtype=self.param_dtype)(h)


class Block(nn.Module):
  """Pre-norm block: x + g1 * attn(norm(x)), then x + g2 * mlp(norm(x)); g = LayerScale gamma or 1.

  Returns (x, None) so the same class runs under nn.scan. x float[B, L, D] -> same.
  """
  heads: int
  mlp_dim: int
  mlp: str
  eps: float
  layer_scale: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: layers.layer_norm(self.eps, name, sh.VIT_EMBED, **types)
    gamma = lambda name: self.param(name, layers.partitioned(nn.initializers.ones_init(), (sh.VIT_EMBED,)),
                                    (x.shape[-1],), self.param_dtype).astype(self.dtype)
    y = Attention(self.heads, name="attn", **types)(norm("attn_norm")(x))
    x = x + (y * gamma("attn_scale") if self.layer_scale else y)
    if self.mlp == "swiglu":
      ffn = SwiGLU(self.mlp_dim, name="mlp", **types)
    else:
      ffn = Mlp(self.mlp_dim, self.mlp, name="mlp", **types)
    y = ffn(norm("mlp_norm")(x))
    x = x + (y * gamma("mlp_scale") if self.layer_scale else y)
    return nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)), None


class VisionTransformer(nn.Module):
  """The tower body; subclasses fix `arch` and read their `Spec` from their config (`spec()`).

  dtype: compute dtype (bf16 for the frozen towers, fp32 for parity); param_dtype: storage.
  frozen: stop gradients at the output (the towers are never trained in SPHINX).
  """
  config: ml_collections.ConfigDict
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  frozen: bool = False

  arch: ClassVar[Arch]

  def spec(self) -> Spec:
    raise NotImplementedError

  @nn.compact
  def __call__(self, images):
    arch, spec = self.arch, self.spec()
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    if arch.input_stats:
      x = renormalise(x, arch.input_stats)
    x = nn.Conv(spec.width, (spec.patch, spec.patch), strides=(spec.patch, spec.patch), padding="VALID",
                use_bias=arch.patch_bias, name="patch_embed",
                kernel_init=layers.partitioned(nn.initializers.lecun_normal(), (None, None, None, sh.VIT_EMBED)),
                bias_init=layers.partitioned(nn.initializers.zeros_init(), (sh.VIT_EMBED,)), **types)(x)
    x = x.reshape(x.shape[0], -1, spec.width)  # row-major over the patch grid, like torch's flatten(2)
    tokens = (spec.image_size // spec.patch) ** 2 + 1
    if x.shape[1] + 1 != tokens:
      raise SphinxError(f"{type(self).__name__}: a {images.shape[1]}x{images.shape[2]} image gives "
                        f"{x.shape[1] + 1} tokens but the position table has {tokens} "
                        f"(image_size {spec.image_size}); feed {spec.image_size}x{spec.image_size} views.")
    table = lambda name, init, shape, axes: self.param(
        name, layers.partitioned(init, axes), shape, self.param_dtype).astype(self.dtype)
    cls = table("class_embedding", nn.initializers.normal(0.02), (spec.width,), (sh.VIT_EMBED,))
    pos = table("position_embedding", sincos_positions, (tokens, spec.width), (None, sh.VIT_EMBED))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, spec.width)), x], axis=1) + pos
    if arch.pre_norm:
      x = layers.layer_norm(spec.eps, "pre_norm", sh.VIT_EMBED, **types)(x)
    stem = x
    block = dict(heads=spec.heads, mlp_dim=spec.mlp_dim, mlp=spec.mlp, eps=spec.eps,
                 layer_scale=arch.layer_scale, **types)
    if spec.scan:
      x, _ = layers.scan_blocks(Block, spec.depth)(name="blocks", **block)(x)
    else:
      for i in range(spec.depth):
        x, _ = Block(name=f"blocks_{i}", **block)(x)
    encoded = x
    x = layers.layer_norm(spec.eps, "post_norm", sh.VIT_EMBED, **types)(x)
    if self.frozen:
      x = jax.lax.stop_gradient(x)
    return x, {"stem": stem, "encoded": encoded}
