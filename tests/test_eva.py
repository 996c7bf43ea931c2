"""BLIP-2's EVA ViT-g tower vs transformers 4.57 `Blip2VisionModel`, tiny width/depth, every weight random
(the qkv bias whole, k part included); plus the shared-ViT behaviours (frozen, bf16, wrong input size,
sharding on 8 host devices)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from transformers import Blip2VisionConfig, Blip2VisionModel

import vit_reference as ref
from configs.sphinx import tiny_towers
from sphinx_jax import sharding as sh
from sphinx_jax.convert import eva as convert
from sphinx_jax.errors import SphinxError
from sphinx_jax.models.vision.eva import EvaVit

CONFIG = tiny_towers(256)["qformer"]  # vision: width 48, 2 layers, 4 heads, MLP 96, 224 px
PREFIX = "vision_model."  # Blip2Model's key prefix for its vision tower


def reference_model(seed: int = 0):
  v = CONFIG.vision
  config = Blip2VisionConfig(hidden_size=v.width, num_hidden_layers=v.layers, num_attention_heads=v.heads,
                             intermediate_size=v.mlp_dim, image_size=v.image_size, patch_size=v.patch,
                             layer_norm_eps=v.eps, hidden_act="gelu", qkv_bias=True, attn_implementation="eager")
  model = ref.randomise(Blip2VisionModel(config).eval(), seed)
  k_bias = model.encoder.layers[0].self_attn.qkv.bias[v.width:2 * v.width]
  assert k_bias.abs().min() > 0  # the k part is randomised too
  return model


def state(model):
  return {PREFIX + k: v for k, v in ref.numpy_state(model).items()}


def images(seed=1, batch=2):
  size = CONFIG.vision.image_size
  return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scan", [True, False])
def test_matches_transformers_blip2_vision(scan):
  model = reference_model()
  x = images()
  with torch.no_grad():
    expected = model(pixel_values=x).last_hidden_state  # post_layernorm on all tokens: what the Q-Former reads
  config = CONFIG.copy_and_resolve_references()
  config.scan = scan
  params, side = convert.to_ours(state(model), config)
  assert side == {}
  ours, out = ref.run(EvaVit(config, dtype=jnp.float32), params, ref.nhwc(x))
  assert ours.shape == (2, 257, CONFIG.vision.width)
  ref.assert_close(ours, expected)
  assert "pre_norm" not in params  # EVA has no LayerNorm before its blocks
  np.testing.assert_array_equal(out["stem"].shape, ours.shape)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(scan, dtype):
  model = reference_model().to(dtype)
  params, side = convert.to_ours(state(model), CONFIG, scan=scan)
  back = convert.to_torch(params, side, CONFIG)
  ref.assert_same_state({k.removeprefix(PREFIX): v for k, v in back.items()}, model)


def test_bad_checkpoints_are_named():
  good = state(reference_model())
  with pytest.raises(SphinxError, match=r"'vision_model\.encoder\.layers\.1\.self_attn\.qkv\.bias'.*\(96,\)"):
    convert.to_ours(dict(good, **{PREFIX + "encoder.layers.1.self_attn.qkv.bias": np.zeros(96, np.float32)}),
                    CONFIG)
  with pytest.raises(SphinxError, match=r"no place.*vision_model\.encoder\.layers\.2\.layer_norm1\.weight"):
    convert.to_ours(dict(good, **{PREFIX + "encoder.layers.2.layer_norm1.weight": np.ones(48, np.float32)}),
                    CONFIG)


def test_frozen_stops_gradients_and_unfrozen_does_not():
  config = CONFIG.copy_and_resolve_references()
  config.vision.layers, config.vision.image_size, config.scan = 1, 28, False  # 5 tokens: a cheap backward
  x = np.ones((1, 28, 28, 3), np.float32)
  params = jax.jit(EvaVit(config, dtype=jnp.float32).init)(jax.random.key(0), x)["params"]

  def grad_norm(frozen):
    loss = lambda p: jnp.sum(EvaVit(config, dtype=jnp.float32, frozen=frozen).apply({"params": p}, x)[0] ** 2)
    return sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(jax.jit(jax.grad(loss))(params)))

  assert grad_norm(frozen=True) == 0.0
  assert grad_norm(frozen=False) > 0.0


def test_bf16_compute_stays_close_to_fp32():
  params, _ = convert.to_ours(state(reference_model()), CONFIG)
  x = ref.nhwc(images(batch=1))
  f32, _ = ref.run(EvaVit(CONFIG, dtype=jnp.float32), params, x)
  bf16, _ = ref.run(EvaVit(CONFIG), params, x)  # default compute dtype: bf16
  assert bf16.dtype == jnp.bfloat16
  a, b = np.asarray(f32, np.float64).ravel(), np.asarray(bf16, np.float64).ravel()
  assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.999


def test_wrong_image_size_is_refused():
  params, _ = convert.to_ours(state(reference_model()), CONFIG)
  with pytest.raises(SphinxError, match=r"112x112 image gives 65 tokens but the position table has 257"):
    EvaVit(CONFIG, dtype=jnp.float32).apply({"params": params}, np.zeros((1, 112, 112, 3), np.float32))


# The shared ViT tree under the default rules: vit_embed -> fsdp; vit_heads, vit_mlp -> tensor; layers, head_dim
# and the q/k/v axis replicated (written by hand from the rules).
GOLDEN_SCANNED = {
    "patch_embed/kernel": P(None, None, None, "fsdp"), "patch_embed/bias": P("fsdp"),
    "class_embedding": P("fsdp"), "position_embedding": P(None, "fsdp"),
    "blocks/attn_norm/scale": P(None, "fsdp"), "blocks/attn_norm/bias": P(None, "fsdp"),
    "blocks/attn/qkv/kernel": P(None, "fsdp", None, "tensor", None),
    "blocks/attn/qkv/bias": P(None, None, "tensor", None),
    "blocks/attn/out/kernel": P(None, "tensor", None, "fsdp"), "blocks/attn/out/bias": P(None, "fsdp"),
    "blocks/mlp_norm/scale": P(None, "fsdp"), "blocks/mlp_norm/bias": P(None, "fsdp"),
    "blocks/mlp/up/kernel": P(None, "fsdp", "tensor"), "blocks/mlp/up/bias": P(None, "tensor"),
    "blocks/mlp/down/kernel": P(None, "tensor", "fsdp"), "blocks/mlp/down/bias": P(None, "fsdp"),
    "post_norm/scale": P("fsdp"), "post_norm/bias": P("fsdp"),
}


def test_sharded_forward_equals_single_device():
  """8 host devices, mesh (data=2, fsdp=2, tensor=2): golden PartitionSpecs and the same features."""
  assert jax.device_count() == 8
  model = EvaVit(CONFIG, dtype=jnp.float32)
  params, _ = convert.to_ours(state(reference_model()), CONFIG)
  x = ref.nhwc(images(batch=4))
  expected, _ = ref.run(model, params, x)

  mesh = sh.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2, expert=1)))
  boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  param_sh = nn.meta.unbox(sh.param_shardings(boxed, mesh, sh.DEFAULT_RULES))
  specs = {path: s.spec for path, s in traverse_util.flatten_dict(
      param_sh, is_leaf=lambda _, v: isinstance(v, NamedSharding), sep="/").items()}
  assert specs == GOLDEN_SCANNED
  placed = jax.tree.map(jax.device_put, params, param_sh)
  data_sh = NamedSharding(mesh, P(("data", "fsdp")))

  def forward(p, images):
    with nn.logical_axis_rules(sh.DEFAULT_RULES):  # activates the block-output constraints
      return model.apply({"params": p}, images)[0]

  with jax.set_mesh(mesh):
    got = jax.jit(forward, in_shardings=(param_sh, data_sh), out_shardings=data_sh)(placed, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5)
