"""Vision towers at full size: JAX forward time vs the PyTorch reference on the same input in the same run, and
achieved FLOP/s vs the machine's matmul roof measured in the same run.

Run:  flock /tmp/sphinx_heavy.lock python bench/towers.py [--towers clip,dinov2,eva,convnext,blip2]
          [--dtype float32|bfloat16] [--batch 1] [--iters 3] [--layers N] [--gemm 2048]
Towers are built one at a time (random weights initialised in torch, moved by the project's converters) and
freed before the next, to stay within memory. `--layers N` keeps the full width but runs N blocks (the ratios
are per-block numbers; use it where the machine cannot hold a full tower twice).

Model FLOPs (forward, per image; matmuls only, norms and softmax left out), a ViT with L tokens, width D,
MLP width F, patch p, depth n:  2*(L-1)*3p^2*D (patch conv) + n * [2*L*D*3D (qkv) + 4*L^2*D (scores and
mix) + 2*L*D*D (out) + MLP], MLP = 4*L*D*F (GELU: up, down) or 6*L*D*F (SwiGLU: two halves up, down).
Roof: the best of jnp.dot (jit) and torch.mm on an n x n x n GEMM in the run dtype, n = --gemm (f32 matmuls at
full precision on both sides: XLA precision 'highest', torch TF32 off), timed per tower.
Timing: after one warm-up call each, the JAX forward, the torch forward and the two GEMMs run interleaved for
--iters rounds and the fastest round of each counts (wall clock; the CPU-time ratio, which other processes on
a shared machine disturb less, is printed beside it).
The tower table maps a name to a function (dtype, args) -> Case; other towers join it the same way.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from sphinx_jax import host_memory  # noqa: E402
from sphinx_jax import config as cfg  # noqa: E402
from sphinx_jax.convert import torch_io  # noqa: E402
# the parity tests' torch references, so the benchmark times exactly what the tests check
from vit_reference import clip_encode_image, numpy_state, sphinx_dinov2_features  # noqa: E402
from roof import TORCH_DTYPES, gemms, roof as measured_roof  # noqa: E402  (bench/ is the script's directory)
from timing import fastest  # noqa: E402


class Case(NamedTuple):
  torch_forward: Callable  # torch NCHW images -> features
  jax_forward: Callable    # jax NHWC images -> features (jitted, params bound)
  flops: float             # model FLOPs per image


def vit_flops(spec) -> float:
  tokens, d, f = (spec.image_size // spec.patch) ** 2 + 1, spec.width, spec.mlp_dim
  mlp = (6 if spec.mlp == "swiglu" else 4) * tokens * d * f
  block = 2 * tokens * d * 3 * d + 4 * tokens * tokens * d + 2 * tokens * d * d + mlp
  return 2 * (tokens - 1) * 3 * spec.patch ** 2 * d + spec.depth * block


def jax_case(module, params, torch_forward) -> Case:
  params = jax.device_put(params)
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
  return Case(torch_forward, partial(apply, params), vit_flops(module.spec()))


def clip_case(dtype: str, args) -> Case:
  import open_clip
  from sphinx_jax.convert import clip as convert
  from sphinx_jax.models.vision.clip import ClipVit
  config = cfg.clip_config(layers=args.layers or 24)
  model_cfg = open_clip.get_model_config("ViT-L-14")
  model_cfg["vision_cfg"]["layers"] = config.layers
  model = open_clip.model.CLIP(**model_cfg)
  model.transformer = None
  model = model.eval().to(TORCH_DTYPES[dtype])
  params, _ = convert.to_ours(numpy_state(model), config)
  return jax_case(ClipVit(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), frozen=True), params,
                  partial(clip_encode_image, model))


def dinov2_case(dtype: str, args) -> Case:
  from dinov2.layers import MemEffAttention, NestedTensorBlock
  from dinov2.models.vision_transformer import DinoVisionTransformer
  from sphinx_jax.convert import dinov2 as convert
  from sphinx_jax.models.vision.dinov2 import DinoV2
  config = cfg.dinov2_config(depth=args.layers or 40)
  model = DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=1536, depth=config.depth, num_heads=24,
                                mlp_ratio=4, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
                                ffn_layer="swiglufused", init_values=1.0, block_chunks=0)
  model = model.eval().to(TORCH_DTYPES[dtype])
  params, _ = convert.to_ours(numpy_state(model), config)
  return jax_case(DinoV2(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), frozen=True), params,
                  partial(sphinx_dinov2_features, model))


def eva_case(dtype: str, args) -> Case:
  from transformers import Blip2VisionConfig, Blip2VisionModel
  from sphinx_jax.convert import eva as convert
  from sphinx_jax.models.vision.eva import EvaVit
  config = cfg.qformer_config()
  config.vision.layers = args.layers or 39
  v = config.vision
  model = Blip2VisionModel(Blip2VisionConfig(
      hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads, intermediate_size=v.mlp_dim,
      image_size=v.image_size, patch_size=v.patch, layer_norm_eps=v.eps, qkv_bias=True))  # sdpa attention
  model = model.eval().to(TORCH_DTYPES[dtype])
  params, _ = convert.to_ours({"vision_model." + k: v for k, v in numpy_state(model).items()}, config)
  return jax_case(EvaVit(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), frozen=True), params,
                  lambda x: model(pixel_values=x).last_hidden_state)


def convnext_flops(config, side: int) -> float:
  """Stem 4x4/4 conv, per block 7x7 depthwise + MLP (C -> 4C -> C), downsample 2x2/2 convs (no norms)."""
  grid, flops = side // 4, 2 * (side // 4) ** 2 * 3 * 16 * config.dims[0]
  for s, (depth, c) in enumerate(zip(config.depths, config.dims)):
    if s:
      grid //= 2
      flops += 2 * grid ** 2 * 4 * config.dims[s - 1] * c
    flops += depth * (2 * grid ** 2 * 49 * c + 16 * grid ** 2 * c * c)
  return flops


def convnext_case(dtype: str, args) -> Case:
  """SPHINX's 224-view path: fp16 nearest 224 -> 256, trunk, 2x2 repeat to 16x16, mean token (257 tokens)."""
  import timm
  import torch.nn.functional as F
  from sphinx_jax.convert import convnext as convert
  from sphinx_jax.models.vision.convnext import ConvNeXt
  config = cfg.convnext_config()
  if args.layers:
    config.depths = tuple(min(d, args.layers) for d in config.depths)
  model = timm.create_model("convnext_xxlarge", pretrained=False, depths=config.depths, num_classes=0)
  model.head.global_pool = torch.nn.Identity()
  model.head.flatten = torch.nn.Identity()
  model = model.eval().to(TORCH_DTYPES[dtype])

  def torch_forward(view):
    fmap = model(F.interpolate(view.half(), size=(256, 256)).to(view))
    tokens = fmap.repeat_interleave(2, dim=3).repeat_interleave(2, dim=2).flatten(-2).permute(0, 2, 1)
    return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)

  params, _ = convert.to_ours(numpy_state(model), config)
  module = ConvNeXt(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), frozen=True)
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
  return Case(torch_forward, partial(apply, jax.device_put(params)), convnext_flops(config, 256))


def qformer_flops(config, image_tokens: int) -> float:
  """Q-Former layers on Q queries: self-attention, cross-attention every `frequency`-th layer, query MLP."""
  c, q, s, e = config.qformer, config.num_query_tokens, image_tokens, config.vision.width
  d, f = c.hidden, c.intermediate
  attn = lambda kv, width: 2 * q * d * d * 2 + 2 * kv * width * d * 2 + 4 * q * kv * d  # q, o; k, v; scores, mix
  crosses = len(range(0, c.layers, c.cross_attention_frequency))
  return c.layers * (attn(q, d) + 4 * q * d * f) + crosses * attn(s, e)


def blip2_case(dtype: str, args) -> Case:
  """SPHINX's BLIP-2 branch: `Blip2Model.get_qformer_features(view).last_hidden_state`, language model removed."""
  from transformers import Blip2Config, Blip2Model
  from sphinx_jax.convert import blip2 as convert
  from sphinx_jax.models.vision.blip2 import Blip2
  from sphinx_jax.models.vision.eva import EvaVit
  config = cfg.qformer_config()
  config.vision.layers = args.layers or 39
  v, c = config.vision, config.qformer
  model = Blip2Model(Blip2Config(
      vision_config=dict(hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads,
                         intermediate_size=v.mlp_dim, image_size=v.image_size, patch_size=v.patch,
                         layer_norm_eps=v.eps, qkv_bias=True),
      qformer_config=dict(hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
                          intermediate_size=c.intermediate, encoder_hidden_size=v.width,
                          cross_attention_frequency=c.cross_attention_frequency),
      text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       vocab_size=64, word_embed_proj_dim=16),
      num_query_tokens=config.num_query_tokens))
  model.language_projection = None
  model.language_model = None
  model = model.eval().to(TORCH_DTYPES[dtype])
  params, _ = convert.to_ours(numpy_state(model), config)
  module = Blip2(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype), frozen=True)
  apply = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])
  flops = vit_flops(EvaVit(config).spec()) + qformer_flops(config, (v.image_size // v.patch) ** 2 + 1)
  return Case(lambda x: model.get_qformer_features(pixel_values=x).last_hidden_state,
              partial(apply, jax.device_put(params)), flops)


TOWERS = {"clip": clip_case, "dinov2": dinov2_case, "eva": eva_case, "convnext": convnext_case,
          "blip2": blip2_case}


def run_tower(name: str, args) -> None:
  case = TOWERS[name](args.dtype, args)
  x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(TORCH_DTYPES[args.dtype])
  xj = jnp.asarray(torch_io.to_numpy(x.permute(0, 2, 3, 1).contiguous()))
  with torch.inference_mode():
    best = fastest({"jax": lambda: case.jax_forward(xj).block_until_ready(), "torch": lambda: case.torch_forward(x),
                    **gemms(args.dtype, args.gemm)}, args.iters)
  roof, roof_name = measured_roof(best, args.gemm)
  (t_jax, c_jax), (t_torch, c_torch) = best["jax"], best["torch"]
  flops = case.flops * args.batch
  print(f"{name:8s} {args.dtype:8s} batch {args.batch}  JAX {t_jax * 1e3:8.1f} ms  torch {t_torch * 1e3:8.1f} ms  "
        f"JAX/torch wall {t_jax / t_torch:4.2f} CPU {c_jax / c_torch:4.2f}  JAX {flops / t_jax / 1e9:6.1f} GFLOP/s "
        f"= {flops / t_jax / roof:5.1%} of roof (torch {flops / t_torch / roof:5.1%}; roof {roof / 1e9:.1f} "
        f"GFLOP/s, {roof_name} {args.gemm}^3)", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--towers", default=",".join(TOWERS))
  parser.add_argument("--dtype", default="float32", choices=sorted(TORCH_DTYPES))
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--layers", type=int, default=0, help="blocks per tower (0: the full depth)")
  parser.add_argument("--gemm", type=int, default=2048, help="side of the roof GEMM")
  args = parser.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  names = args.towers.split(",")
  unknown = [n for n in names if n not in TOWERS]
  if unknown:
    sys.exit(f"bench/towers.py: unknown tower(s) {unknown}; choose from {sorted(TOWERS)}.")
  print(f"device {jax.devices()[0].device_kind}, torch threads {torch.get_num_threads()}", flush=True)
  for name in names:
    run_tower(name, args)
    gc.collect()


if __name__ == "__main__":
  host_memory.restart_with_allocator()  # the allocator the sphinx-jax program runs with
  main()
