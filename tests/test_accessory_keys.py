"""Golden key tables of LLaMA2-Accessory SPHINX checkpoints: every variant's exported keys are exactly the
original's (SPHINX.md §5.3, written out here by hand, not produced by the converter), tiny and full size.

`golden(variant, tiny)` spells the original's state_dict names and shapes from a handful of widths: FULL_*
hold the released ones (SPHINX.md §2-§3), TINY_* those of the tiny twins (configs/sphinx.py). The same table
builds the source checkpoints of test_accessory_convert.py and checks exports from our own trees: the tiny
twins' random params (written to disk) and the released sizes (shapes only).
"""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
from flax import linen as nn

from configs import sphinx as presets
from sphinx_jax.convert import accessory
from sphinx_jax.models.vision import clip as clip_model
from sphinx_jax.models.vision import dinov2 as dinov2_model

# Widths per tower and decoder. Full size: SPHINX.md §2.1, §2.2, §3.2-§3.5; tiny: configs/sphinx.py.
FULL_TOWERS = dict(
    clip=dict(width=1024, layers=24, mlp=4096, positions=257, embed=768, text_vocab=49408, text_width=768),
    convnext=dict(dims=(384, 768, 1536, 3072), depths=(3, 4, 30, 3)),
    dinov2=dict(width=1536, depth=40, mlp=4096),
    qformer=dict(vision_width=1408, vision_layers=39, vision_mlp=6144, hidden=768, layers=12, intermediate=3072,
                 queries=32))
TINY_TOWERS = dict(
    clip=dict(width=64, layers=2, mlp=256, positions=257, embed=32, text_vocab=64, text_width=32),
    convnext=dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1)),
    dinov2=dict(width=32, depth=2, mlp=64),
    qformer=dict(vision_width=48, vision_layers=2, vision_mlp=96, hidden=64, layers=2, intermediate=128, queries=32))
FULL_LLMS = dict(
    llama2_13b=dict(dim=5120, layers=40, heads=40, kv_heads=40, hidden=13824, vocab=32000),
    tinyllama=dict(dim=2048, layers=22, heads=32, kv_heads=4, hidden=5632, vocab=32000),
    mixtral=dict(dim=4096, layers=32, heads=32, kv_heads=8, hidden=14336, vocab=32000, experts=8))
TINY_LLMS = dict(
    llama2_13b=dict(dim=64, layers=2, heads=4, kv_heads=4, hidden=192, vocab=32000),   # int(2*256/3)=170 -> 192
    tinyllama=dict(dim=64, layers=2, heads=4, kv_heads=2, hidden=192, vocab=32000),
    mixtral=dict(dim=64, layers=2, heads=4, kv_heads=2, hidden=96, vocab=32000, experts=4))
ALL = ("qformer", "clip", "convnext", "dinov2")
VARIANTS = {  # released name -> (llama_type, decoder, towers)
    "sphinx": ("llama_ens", "llama2_13b", ALL),
    "sphinx_1k": ("llama_ens5", "llama2_13b", ALL),
    "sphinx_v2_1k": ("llama_ens5", "llama2_13b", ALL),
    "sphinx_tiny": ("llama_ens_light", "tinyllama", ("convnext", "dinov2")),
    "sphinx_tiny_1k": ("llama_ens5_light", "tinyllama", ("convnext", "dinov2")),
    "sphinx_moe": ("mixtral_sparse_ens", "mixtral", ALL),
    "sphinx_moe_1k": ("mixtral_sparse_ens5", "mixtral", ALL),
}


def llm_keys(m):
  d, hd = m["dim"], m["dim"] // m["heads"]
  out = {"tok_embeddings.weight": (m["vocab"], d), "norm.weight": (d,), "output.weight": (m["vocab"], d)}
  for i in range(m["layers"]):
    p = f"layers.{i}."
    out.update({p + "attention.wq.weight": (m["heads"] * hd, d), p + "attention.wk.weight": (m["kv_heads"] * hd, d),
                p + "attention.wv.weight": (m["kv_heads"] * hd, d), p + "attention.wo.weight": (d, m["heads"] * hd),
                p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,)})
    if "experts" in m:
      rows = m["experts"] * m["hidden"]
      out.update({p + "feed_forward.w1": (rows, d), p + "feed_forward.w2": (rows, d), p + "feed_forward.w3": (rows, d),
                  p + "feed_forward.gate.weight": (m["experts"], d)})
    else:
      out.update({p + "feed_forward.w1.weight": (m["hidden"], d), p + "feed_forward.w2.weight": (d, m["hidden"]),
                  p + "feed_forward.w3.weight": (m["hidden"], d)})
  return out


def head_keys(d, channels, qformer_hidden):
  out = {"start_img": (1, 1, d), "end_img": (1, 1, d), "visual_proj.0.weight": (d, channels),
         "visual_proj.0.bias": (d,), "visual_proj.1.weight": (d,), "visual_proj.1.bias": (d,)}
  if qformer_hidden:
    out.update({"qformer_proj.0.weight": (d, qformer_hidden), "qformer_proj.0.bias": (d,),
                "qformer_proj.1.weight": (d,), "qformer_proj.1.bias": (d,)})
  return out


def clip_keys(c):
  w, t, p = c["width"], c["text_width"], "clip.visual."
  out = {"clip.positional_embedding": (77, t), "clip.text_projection": (t, c["embed"]), "clip.logit_scale": (),
         "clip.token_embedding.weight": (c["text_vocab"], t), "clip.ln_final.weight": (t,),
         "clip.ln_final.bias": (t,), p + "class_embedding": (w,), p + "positional_embedding": (c["positions"], w),
         p + "proj": (w, c["embed"]), p + "conv1.weight": (w, 3, 14, 14), p + "ln_pre.weight": (w,),
         p + "ln_pre.bias": (w,), p + "ln_post.weight": (w,), p + "ln_post.bias": (w,)}
  for i in range(c["layers"]):
    b = f"{p}transformer.resblocks.{i}."
    out.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "attn.in_proj_weight": (3 * w, w),
                b + "attn.in_proj_bias": (3 * w,), b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                b + "ln_2.weight": (w,), b + "ln_2.bias": (w,), b + "mlp.c_fc.weight": (c["mlp"], w),
                b + "mlp.c_fc.bias": (c["mlp"],), b + "mlp.c_proj.weight": (w, c["mlp"]), b + "mlp.c_proj.bias": (w,)})
  return out


def convnext_keys(c):
  p, dims = "openclip_convnext_xxl.", c["dims"]
  out = {p + "stem.0.weight": (dims[0], 3, 4, 4), p + "stem.0.bias": (dims[0],), p + "stem.1.weight": (dims[0],),
         p + "stem.1.bias": (dims[0],), p + "head.norm.weight": (dims[-1],), p + "head.norm.bias": (dims[-1],)}
  for s, (ch, depth) in enumerate(zip(dims, c["depths"])):
    if s:
      d = f"{p}stages.{s}.downsample."
      out.update({d + "0.weight": (dims[s - 1],), d + "0.bias": (dims[s - 1],), d + "1.weight": (ch, dims[s - 1], 2, 2),
                  d + "1.bias": (ch,)})
    for j in range(depth):
      b = f"{p}stages.{s}.blocks.{j}."
      out.update({b + "conv_dw.weight": (ch, 1, 7, 7), b + "conv_dw.bias": (ch,), b + "norm.weight": (ch,),
                  b + "norm.bias": (ch,), b + "mlp.fc1.weight": (4 * ch, ch), b + "mlp.fc1.bias": (4 * ch,),
                  b + "mlp.fc2.weight": (ch, 4 * ch), b + "mlp.fc2.bias": (ch,), b + "gamma": (ch,)})
  return out


def dinov2_keys(c):
  p, w, f = "dinov2_vitg14.", c["width"], c["mlp"]
  out = {p + "cls_token": (1, 1, w), p + "pos_embed": (1, 1370, w), p + "mask_token": (1, w),
         p + "patch_embed.proj.weight": (w, 3, 14, 14), p + "patch_embed.proj.bias": (w,), p + "norm.weight": (w,),
         p + "norm.bias": (w,)}
  for i in range(c["depth"]):
    b = f"{p}blocks.{i}."
    out.update({b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
                b + "attn.qkv.bias": (3 * w,), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
                b + "ls1.gamma": (w,), b + "norm2.weight": (w,), b + "norm2.bias": (w,),
                b + "mlp.w12.weight": (2 * f, w), b + "mlp.w12.bias": (2 * f,), b + "mlp.w3.weight": (w, f),
                b + "mlp.w3.bias": (w,), b + "ls2.gamma": (w,)})
  return out


def qformer_keys(c):
  v, h, p = c["vision_width"], c["hidden"], "qformer."
  e = p + "vision_model.embeddings."
  out = {p + "query_tokens": (1, c["queries"], h), e + "class_embedding": (1, 1, v),
         e + "position_embedding": (1, 257, v), e + "patch_embedding.weight": (v, 3, 14, 14),
         e + "patch_embedding.bias": (v,), p + "vision_model.post_layernorm.weight": (v,),
         p + "vision_model.post_layernorm.bias": (v,), p + "qformer.layernorm.weight": (h,),
         p + "qformer.layernorm.bias": (h,)}
  for i in range(c["vision_layers"]):
    b = f"{p}vision_model.encoder.layers.{i}."
    out.update({b + "self_attn.qkv.weight": (3 * v, v), b + "self_attn.qkv.bias": (3 * v,),
                b + "self_attn.projection.weight": (v, v), b + "self_attn.projection.bias": (v,),
                b + "layer_norm1.weight": (v,), b + "layer_norm1.bias": (v,),
                b + "mlp.fc1.weight": (c["vision_mlp"], v),
                b + "mlp.fc1.bias": (c["vision_mlp"],), b + "mlp.fc2.weight": (v, c["vision_mlp"]),
                b + "mlp.fc2.bias": (v,), b + "layer_norm2.weight": (v,), b + "layer_norm2.bias": (v,)})
  for i in range(c["layers"]):
    b = f"{p}qformer.encoder.layer.{i}."
    for name in ("query", "key", "value"):
      out.update({f"{b}attention.attention.{name}.weight": (h, h), f"{b}attention.attention.{name}.bias": (h,)})
    out.update({b + "attention.output.dense.weight": (h, h), b + "attention.output.dense.bias": (h,),
                b + "attention.output.LayerNorm.weight": (h,), b + "attention.output.LayerNorm.bias": (h,),
                b + "intermediate_query.dense.weight": (c["intermediate"], h),
                b + "intermediate_query.dense.bias": (c["intermediate"],),
                b + "output_query.dense.weight": (h, c["intermediate"]), b + "output_query.dense.bias": (h,),
                b + "output_query.LayerNorm.weight": (h,), b + "output_query.LayerNorm.bias": (h,)})
    if i % 2 == 0:  # cross_attention_frequency 2: layers 0, 2, 4, ...
      x = b + "crossattention."
      out.update({x + "attention.query.weight": (h, h), x + "attention.query.bias": (h,),
                  x + "attention.key.weight": (h, v), x + "attention.key.bias": (h,),
                  x + "attention.value.weight": (h, v), x + "attention.value.bias": (h,),
                  x + "output.dense.weight": (h, h), x + "output.dense.bias": (h,),
                  x + "output.LayerNorm.weight": (h,), x + "output.LayerNorm.bias": (h,)})
  return out


TOWER_KEYS = {"qformer": qformer_keys, "clip": clip_keys, "convnext": convnext_keys, "dinov2": dinov2_keys}


def golden(variant, tiny=True):
  """{key without `llma.`: shape} of the original's state_dict for `variant` (tiny twin or released size)."""
  _, llm_name, towers = VARIANTS[variant]
  llm, tower_dims = (TINY_LLMS if tiny else FULL_LLMS)[llm_name], (TINY_TOWERS if tiny else FULL_TOWERS)
  channels = sum({"clip": tower_dims["clip"]["width"], "convnext": tower_dims["convnext"]["dims"][-1],
                  "dinov2": tower_dims["dinov2"]["width"]}[t] for t in towers if t != "qformer")
  out = llm_keys(llm)
  out.update(head_keys(llm["dim"], channels, tower_dims["qformer"]["hidden"] if "qformer" in towers else 0))
  for t in towers:
    out.update(TOWER_KEYS[t](tower_dims[t]))
  return out


def test_golden_tables_match_the_published_full_size_counts():
  """The hand-written patterns reproduce SPHINX.md's counts (2349 / 1152 / 2309) and parameter totals."""
  assert len(golden("sphinx", tiny=False)) == 2349
  assert len(golden("sphinx_tiny", tiny=False)) == 1152
  assert len(golden("sphinx_moe", tiny=False)) == 2309
  assert sum(int(np.prod(s)) for s in golden("sphinx", tiny=False).values()) == 16_462_228_609
  assert sum(int(np.prod(s)) for s in golden("sphinx_tiny", tiny=False).values()) == 3_089_374_592
  assert sum(int(np.prod(s)) for s in golden("sphinx_moe", tiny=False).values()) == 50_142_595_201


# ------------------------------------------------------------------------------- exports from our trees
@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
  """A real (small) sentencepiece model; the converter copies it beside the shards."""
  out = tmp_path_factory.mktemp("spm") / "tokenizer.model"
  lines = [f"a chat between a curious human and an assistant number {i} about boxes and points" for i in range(200)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=60,
                                 model_type="bpe", byte_fallback=False, minloglevel=2)
  out.write_bytes(model.getvalue())
  return out


SIDE_SHAPES = {"clip": clip_model.side_shapes, "dinov2": dinov2_model.side_shapes}  # the towers with extras


def our_shapes(model):
  """{"llm", "towers", "fusion", "extras"} as jax.ShapeDtypeStruct: the model's own init (nothing allocated)
  plus the side trees of the towers that carry unused leaves."""
  from sphinx_jax.models import sphinx as sphinx_model  # the whole model; test_accessory_convert needs only tables
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  images = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
  tree = nn.meta.unbox(jax.eval_shape(sphinx_model.Sphinx(model).init, jax.random.key(0), tokens, images))["params"]
  tree["extras"] = {t: SIDE_SHAPES[t](model[t]) for t in model.towers if t in SIDE_SHAPES}
  return tree


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_of_random_tiny_params_has_exactly_the_original_keys(variant, tmp_path, tokenizer_model):
  """Random params in the model's own tree (tiny twin) export to a file holding exactly the original's keys
  (`llma.`-prefixed) and shapes, all bf16."""
  config = presets.variant_config(f"tiny_{variant}")
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), our_shapes(config.model))
  accessory.export_accessory(params, config, tokenizer_model, tmp_path / "out", progress=False)
  state = torch.load(tmp_path / "out" / "consolidated.00-of-01.model.pth", weights_only=True)
  assert sorted(state) == sorted(f"llma.{k}" for k in golden(variant))
  assert {k: tuple(v.shape) for k, v in state.items()} == {f"llma.{k}": s for k, s in golden(variant).items()}
  assert {v.dtype for v in state.values()} == {torch.bfloat16}


@pytest.mark.slow  # ~1 min: the tower converters trace full-size unscanned inits for their expected shapes
@pytest.mark.parametrize("variant,count", [("sphinx", 2349), ("sphinx_tiny", 1152), ("sphinx_moe", 2309)])
def test_full_size_export_key_counts_from_shapes_only(variant, count):
  """Released sizes, shapes only: zero-stride stand-ins (no memory) go through the whole export key map."""
  model = presets.variant_config(variant).model
  stand_in = lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape)
  state = accessory.accessory_state(jax.tree.map(stand_in, our_shapes(model)), model)
  assert len(state) == count
  assert {k: tuple(v.shape) for k, v in state.items()} == golden(variant, tiny=False)
