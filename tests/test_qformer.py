"""BLIP-2 branch vs transformers 4.57 (tiny configs, every weight random): the Q-Former alone against
`Blip2QFormerModel`, the whole branch (EVA ViT + query tokens + Q-Former) against
`Blip2Model.get_qformer_features(...).last_hidden_state`, and the converters both ways."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers import Blip2Config, Blip2Model, Blip2QFormerConfig, Blip2QFormerModel

from sphinx_jax import config as cfg
from sphinx_jax.convert import blip2 as convert
from sphinx_jax.errors import SphinxError
from sphinx_jax.models.vision import blip2, qformer
from vit_reference import assert_close, assert_same_state, nhwc, numpy_state, randomise

assert transformers.__version__ == "4.57.6"  # key names and get_qformer_features' return type are pinned
PREFIX = "qformer."
# REFERENCES.md §1f tiny config, with 4 Q-Former layers so that scanning sees two groups and plain layers.
VISION = dict(width=48, layers=2, heads=4, mlp_dim=96, patch=14, image_size=56, eps=1e-6)
QFORMER = dict(hidden=64, layers=4, heads=4, intermediate=128, cross_attention_frequency=2, eps=1e-12)
QUERIES = 8


def tiny_config(scan=True):
  return cfg.qformer_config(vision=VISION, qformer=QFORMER, num_query_tokens=QUERIES, scan=scan)


def hf_qformer_config():
  return Blip2QFormerConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                            encoder_hidden_size=48, cross_attention_frequency=2)


@pytest.fixture(scope="module")
def hf_qformer():
  return randomise(Blip2QFormerModel(hf_qformer_config()).eval(), seed=0)


@pytest.fixture(scope="module")
def hf_blip2():
  """Blip2Model as SPHINX keeps it: language model and projection removed."""
  config = Blip2Config(
      vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                         image_size=56, patch_size=14),
      qformer_config=hf_qformer_config().to_dict(),
      text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       vocab_size=64, word_embed_proj_dim=16, max_position_embeddings=32),
      num_query_tokens=QUERIES)
  model = Blip2Model(config)
  model.language_projection = None
  model.language_model = None
  return randomise(model.eval(), seed=1)


def _randn(*shape, seed):
  return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scan", [True, False])
def test_qformer_matches_transformers(hf_qformer, scan):
  config = tiny_config(scan)
  tree = convert.qformer_to_ours(numpy_state(hf_qformer), config, prefix="", scan=scan)
  queries, image = _randn(2, QUERIES, 64, seed=2), _randn(2, 17, 48, seed=3)
  module = qformer.QFormer(config, dtype=jnp.float32)
  ours = jax.jit(module.apply)({"params": tree}, jnp.asarray(queries.numpy()), jnp.asarray(image.numpy()))
  with torch.no_grad():
    want = hf_qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
  assert_close(ours, want)


@pytest.mark.filterwarnings("ignore:Deprecation notice")  # 4.57's legacy output object is what SPHINX reads
@pytest.mark.parametrize("scan", [True, False])
def test_blip2_branch_matches_get_qformer_features(hf_blip2, scan):
  config = tiny_config(scan)
  params, side = convert.to_ours(numpy_state(hf_blip2), config)
  assert side == {}
  images = _randn(2, 3, 56, 56, seed=4)
  ours, out = jax.jit(blip2.Blip2(config, dtype=jnp.float32).apply)({"params": params}, jnp.asarray(nhwc(images)))
  with torch.no_grad():
    want = hf_blip2.get_qformer_features(pixel_values=images).last_hidden_state
    image = hf_blip2.vision_model(pixel_values=images).last_hidden_state
  assert ours.shape == (2, QUERIES, 64)
  assert_close(out["image"], image)
  assert_close(ours, want)


@pytest.mark.parametrize("scan", [True, False])
def test_round_trip_is_bit_exact(hf_blip2, scan):
  state = {PREFIX + k: v for k, v in numpy_state(hf_blip2).items()}
  config = tiny_config(scan)
  params, side = convert.to_ours(state, config, prefix=PREFIX)
  if scan:
    assert params["qformer"]["groups"]["layer_0"]["cross_attn"]["key"]["kernel"].shape == (2, 48, 4, 16)
    assert "cross_attn" not in params["qformer"]["groups"]["layer_1"]
  back = convert.to_torch(params, side, config, prefix=PREFIX)
  assert_same_state({k[len(PREFIX):]: v for k, v in back.items()}, hf_blip2)


def test_converter_rejects_bad_checkpoints(hf_blip2):
  state = numpy_state(hf_blip2)
  config = tiny_config()
  missing = dict(state)
  del missing["qformer.encoder.layer.2.crossattention.output.LayerNorm.bias"]
  with pytest.raises(SphinxError, match=r"qformer\.encoder\.layer\.2\.crossattention\.output\.LayerNorm\.bias"):
    convert.to_ours(missing, config)
  wrong = dict(state, **{"qformer.encoder.layer.0.crossattention.attention.key.weight": np.zeros((64, 64), np.float32)})
  with pytest.raises(SphinxError, match=r"crossattention\.attention\.key\.weight.*\(64, 48\)"):
    convert.to_ours(wrong, config)
  wrong = dict(state, query_tokens=np.zeros((1, QUERIES + 1, 64), np.float32))
  with pytest.raises(SphinxError, match="query_tokens"):
    convert.to_ours(wrong, config)
  extra = dict(state, **{"qformer.encoder.layer.1.crossattention.attention.query.bias": np.zeros(64, np.float32),
                         "language_projection.weight": np.zeros((16, 64), np.float32)})
  with pytest.raises(SphinxError, match=r"language_projection\.weight"):
    convert.to_ours(extra, config)


def test_frozen_stops_gradients(hf_blip2):
  config = tiny_config()
  params, _ = convert.to_ours(numpy_state(hf_blip2), config)
  images = jnp.asarray(nhwc(_randn(1, 3, 56, 56, seed=5)))

  def total(tokens, frozen):
    out, _ = blip2.Blip2(config, dtype=jnp.float32, frozen=frozen).apply(
        {"params": dict(params, query_tokens=tokens)}, images)
    return (out ** 2).sum()

  grad = jax.jit(jax.grad(total), static_argnums=1)
  assert float(jnp.abs(grad(params["query_tokens"], True)).max()) == 0
  assert float(jnp.abs(grad(params["query_tokens"], False)).max()) > 0


def test_unscannable_layer_count_is_named():
  config = cfg.qformer_config(vision=VISION, qformer=dict(QFORMER, layers=3), num_query_tokens=QUERIES)
  with pytest.raises(SphinxError, match="cross_attention_frequency"):
    qformer.QFormer(config).init(jax.random.key(0), jnp.zeros((1, QUERIES, 64)), jnp.zeros((1, 17, 48)))
