"""OpenCLIP ConvNeXt-XXLarge trunk (`llma.openclip_convnext_xxl`) and SPHINX's use of it.

Mirrors timm `convnext_xxlarge` (timm 1.0.31 `ConvNeXt`, `ConvNeXtStage`, `ConvNeXtBlock`) as open_clip keeps it
and SPHINX trims it: stem Conv 4x4/4 + LayerNorm2d; stages 1..3 open with LayerNorm2d + Conv 2x2/2; a block is
depthwise Conv 7x7 (bias) -> LayerNorm -> Linear 4C -> exact GELU -> Linear C -> * gamma -> + residual; the
head keeps only `head.norm` (LayerNorm2d), so the trunk returns norm(last feature map). Every eps is 1e-5.
Then SPHINX's `encode_image` (llama_ens*.py, llama_ens_light.py, mixtral_sparse_ens*.py; SPHINX.md §3.3):
  input_size 256 (224-px views): fp16 round, legacy-nearest 224 -> 256, trunk -> 8x8, each cell 2x2 -> 16x16;
  input_size 512: trunk on the 512 view -> 16x16; the 1-view variants round the view to fp16 first
  (`F.interpolate(x.half(), size=(512, 512))`), the 5-view ones feed their views as they are (`half_input`);
  then row-major flatten and the mean over the 256 tokens prepended.

Letters: B batch, S input side, C channels of a stage (384, 768, 1536, 3072 at full size).
In: float[B, S, S, 3] NHWC, CLIP-normalised (S = 224 for input_size 256, else input_size).
Out: float[B, 257, C4], plus {"features": float[B, input_size/32, input_size/32, C4]} (the trunk output).
Parameter tree: stem_conv, stem_norm, stages_{s}/{downsample_norm, downsample_conv (s >= 1), blocks/…
(scanned, leading [depth]) or blocks_{j}/…}, head_norm.
Block: conv_dw_kernel [7, 7, 1, C], conv_dw_bias [C], norm, fc1, fc2, gamma [C].
Logical axes: CONV_IN on the residual-stream channels, CONV_OUT on the 4C hidden and the downsample output.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sphinx_jax import sharding as sh
from sphinx_jax.config import SPHINX_GRID
from sphinx_jax.errors import SphinxError
from sphinx_jax.models import layers
from sphinx_jax.models.vision import resize

# Order: conv helpers -> Block, Stage -> ConvNeXt -> token helpers.


def _conv(features, kernel, axes, name, **types):
  """Conv kernel x kernel, stride kernel (stem 4/4, downsample 2/2), bias; the HWIO kernel carries `axes`."""
  return nn.Conv(features, (kernel, kernel), strides=(kernel, kernel), padding="VALID", use_bias=True, name=name,
                 kernel_init=layers.partitioned(nn.initializers.lecun_normal(), axes),
                 bias_init=layers.partitioned(nn.initializers.zeros_init(), axes[-1:]), **types)


def depthwise_conv(x, kernel, bias):
  """Per-channel 'same' convolution as a sum of shifted, weighted copies of the zero-padded input.

  XLA's CPU backend runs a grouped convolution with one group per channel ~14x slower than this fused
  elementwise sum (measured at 16x16x1536, 7x7); on TPU/GPU the sum fuses into one loop as well.
  Args: x float[B, h, w, C], kernel float[k, k, 1, C] (HWIO, as nn.Conv with feature_group_count=C), bias [C].
  Returns: float[B, h, w, C].
  """
  k = kernel.shape[0]
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      term = padded[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out + bias


class Block(nn.Module):
  """x + gamma * fc2(gelu(fc1(norm(dwconv7x7(x))))). x float[B, h, w, C] -> same; returns (x, None) for scan."""
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    param = lambda name, init, shape, axes: self.param(name, layers.partitioned(init, axes), shape,
                                                       self.param_dtype).astype(self.dtype)
    kernel = param("conv_dw_kernel", nn.initializers.lecun_normal(), (7, 7, 1, c), (None, None, None, sh.CONV_IN))
    bias = param("conv_dw_bias", nn.initializers.zeros_init(), (c,), (sh.CONV_IN,))
    y = depthwise_conv(x, kernel, bias)
    y = layers.layer_norm(self.eps, "norm", sh.CONV_IN, **types)(y)
    y = layers.dense(4 * c, (sh.CONV_IN, sh.CONV_OUT), "fc1", use_bias=True, **types)(y)
    y = layers.dense(c, (sh.CONV_OUT, sh.CONV_IN), "fc2", use_bias=True, **types)(layers.gelu_exact(y))
    # timm's LayerScale init (1e-6); real values always come from a checkpoint.
    gamma = param("gamma", nn.initializers.constant(1e-6), (c,), (sh.CONV_IN,))
    x = x + y * gamma
    return nn.with_logical_constraint(x, (sh.BATCH, None, None, sh.ACT_EMBED)), None


class Stage(nn.Module):
  """[LayerNorm2d + Conv 2x2/2 to `width` when `downsample`], then `depth` blocks. [B, h, w, C'] -> [B, h', w', C]."""
  width: int
  depth: int
  downsample: bool
  eps: float
  scan: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.downsample:
      x = layers.layer_norm(self.eps, "downsample_norm", sh.CONV_IN, **types)(x)
      x = _conv(self.width, 2, (None, None, sh.CONV_IN, sh.CONV_OUT), "downsample_conv", **types)(x)
    if self.scan:
      x, _ = layers.scan_blocks(Block, self.depth)(self.eps, name="blocks", **types)(x)
    else:
      for j in range(self.depth):
        x, _ = Block(self.eps, name=f"blocks_{j}", **types)(x)
    return x


class ConvNeXt(nn.Module):
  """The trunk plus SPHINX's token layout. `config`: sphinx_jax.config.convnext_config().

  dtype: compute dtype (bf16 for the frozen tower, fp32 for parity); param_dtype: storage.
  half_input: round the (resized) input to fp16 as the original's `.half()` does (all variants except the
    5-view 512-px ones). frozen: stop gradients at the output. token_grid: side of the token grid the map is
    repeated up to (the model's `config.patch_grid`: 16 in SPHINX).
  """
  config: ml_collections.ConfigDict
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  half_input: bool = True
  frozen: bool = False
  token_grid: int = SPHINX_GRID

  @nn.compact
  def __call__(self, images):
    c = self.config
    types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    size = int(c.input_size)
    if size not in (256, 512):
      raise SphinxError(f"config.convnext.input_size: {size}; SPHINX uses 256 (224 views) or 512.")
    x = resize.nearest(images, (size, size), half=self.half_input).astype(self.dtype)
    x = _conv(c.dims[0], 4, (None, None, None, sh.CONV_IN), "stem_conv", **types)(x)
    x = layers.layer_norm(c.eps, "stem_norm", sh.CONV_IN, **types)(x)
    for s, (depth, width) in enumerate(zip(c.depths, c.dims)):
      x = Stage(width, depth, s > 0, c.eps, c.scan, name=f"stages_{s}", **types)(x)
    features = layers.layer_norm(c.eps, "head_norm", sh.CONV_IN, **types)(x)
    tokens = grid_tokens(features, size, self.token_grid)
    if self.frozen:
      tokens = jax.lax.stop_gradient(tokens)
    return tokens, {"features": features}


def grid_tokens(features, input_size: int, token_grid: int):
  """Trunk map -> SPHINX's 257 tokens: [mean, 16x16 grid row-major] (token_grid 16; `patch_grid` of the model).

  input_size 256: the 8x8 map has each cell repeated 2x2 (`repeat_interleave(2)` on W then H) first; the mean
  is taken over the 256 repeated tokens as the original does. Args: features float[B, g, g, C] with
  g = input_size / 32. Returns: float[B, 1 + token_grid^2, C].
  """
  g = features.shape[1]
  if g * 32 != input_size or token_grid % g:
    raise SphinxError(f"ConvNeXt: a {g}x{g} feature map does not come from a {input_size}-px input; feed "
                      f"{input_size}x{input_size} views (or 224 for input_size 256).")
  rep = token_grid // g
  grid = jnp.repeat(jnp.repeat(features, rep, axis=2), rep, axis=1)
  tokens = grid.reshape(grid.shape[0], token_grid * token_grid, grid.shape[-1])
  return jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)
