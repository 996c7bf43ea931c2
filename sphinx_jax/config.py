"""Configuration schema: the pieces every preset is built from, and `validate(config)`.

Configs are `ml_collections.ConfigDict`s returned by `configs/<file>.py:get_config(arg)`. This module holds
the shared building blocks (full-size values from ../shared/SPHINX.md, tiny CPU twins with the same structure)
and the checks run at start-up; the released variants themselves are tables in `configs/sphinx.py`.

Layout of a config:
  model.llm       decoder (LLaMA-2 / TinyLlama; `moe` for Mixtral)
  model.towers    tuple of tower names in use, in the original's fusion order
  model.clip | convnext | dinov2 | qformer    one sub-config per tower
  model.image_size, model.views, model.dtype, model.param_dtype
  mesh            axis sizes ('data', 'fsdp', 'tensor', 'expert'); -1 = the rest
  rules           logical -> mesh axis table (sharding.DEFAULT_RULES when None)
"""
from __future__ import annotations

import ml_collections

from sphinx_jax.errors import SphinxError

TOWER_ORDER = ("qformer", "clip", "convnext", "dinov2")  # qformer tokens first; [clip|convnext|dinov2] channels
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_qkv_proj")
ATTENTION_BACKENDS = ("xla", "cudnn", "splash")


def llm_config(**overrides) -> ml_collections.ConfigDict:
  """LLaMA-2-13B decoder (SPHINX.md §2.1); overrides give TinyLlama, Mixtral or tiny twins."""
  c = ml_collections.ConfigDict(dict(
      vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
      multiple_of=256, ffn_dim_multiplier=None, hidden_dim=None,  # hidden_dim fixes the FFN width (Mixtral)
      norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_seq_len=4096,
      moe=None,  # ConfigDict(num_experts, top_k, load_balancing_weight) for Mixtral
      scan_layers=True, remat_policy="none", attention="xla",
  ))
  c.update(overrides)
  return c


def tinyllama_config(**overrides):
  """TinyLlama-1.1B (SPHINX-Tiny): GQA with 4 KV heads."""
  return llm_config(**{**dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4), **overrides})


def mixtral_config(**overrides):
  """Mixtral-8x7B (SPHINX-MoE, SPHINX.md §2.2): 8 experts, top-2, rope theta 1e6."""
  return llm_config(**{**dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, rope_theta=1e6,
                              moe=dict(num_experts=8, top_k=2, load_balancing_weight=0.0)), **overrides})


def ffn_hidden_dim(llm) -> int:
  """FFN width rule of the original: int(2*4*dim/3), times ffn_dim_multiplier, rounded up to multiple_of.

  13B: int(2*20480/3) = 13653 -> 13824; TinyLlama: 5461 -> 5632. `hidden_dim` set explicitly wins.
  """
  if llm.get("hidden_dim"):
    return int(llm.hidden_dim)
  hidden = int(2 * (4 * llm.dim) / 3)
  if llm.get("ffn_dim_multiplier") is not None:
    hidden = int(llm.ffn_dim_multiplier * hidden)
  return llm.multiple_of * ((hidden + llm.multiple_of - 1) // llm.multiple_of)


def clip_config(**overrides):
  """open_clip ViT-L/14 visual tower (SPHINX.md §3.2). `act` is 'gelu' (current loader) or 'quick_gelu'."""
  c = ml_collections.ConfigDict(dict(width=1024, layers=24, heads=16, mlp_dim=4096, patch=14, image_size=224,
                                     eps=1e-5, act="gelu", embed_dim=768, scan=True,
                                     text=dict(vocab=49408, context=77, width=768)))
  c.update(overrides)
  return c


def convnext_config(**overrides):
  """timm convnext_xxlarge trunk (SPHINX.md §3.3); `input_size` 256 (224 views upsampled) or 512."""
  c = ml_collections.ConfigDict(dict(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), eps=1e-5,
                                     input_size=256, scan=True))
  c.update(overrides)
  return c


def dinov2_config(**overrides):
  """DINOv2 ViT-g/14 hub model, no registers (SPHINX.md §3.5); `pos_grid` is the stored 37x37 table."""
  c = ml_collections.ConfigDict(dict(width=1536, depth=40, heads=24, mlp_hidden=4096, patch=14, image_size=224,
                                     pos_grid=37, interpolate_offset=0.1, eps=1e-6, scan=True))
  c.update(overrides)
  return c


def qformer_config(**overrides):
  """BLIP-2 (opt-2.7b config) EVA ViT-g/14 + Q-Former (SPHINX.md §3.4)."""
  c = ml_collections.ConfigDict(dict(
      vision=dict(width=1408, layers=39, heads=16, mlp_dim=6144, patch=14, image_size=224, eps=1e-6),
      qformer=dict(hidden=768, layers=12, heads=12, intermediate=3072, cross_attention_frequency=2, eps=1e-12),
      num_query_tokens=32, scan=True))
  c.update(overrides)
  return c


TOWER_BUILDERS = {"clip": clip_config, "convnext": convnext_config, "dinov2": dinov2_config,
                  "qformer": qformer_config}


def model_config(llm, towers, image_size, views, **overrides):
  """A whole SPHINX model config: decoder, towers in use, resolution and views."""
  c = ml_collections.ConfigDict(dict(llm=llm, towers=tuple(towers), image_size=image_size, views=views,
                                     dtype="bfloat16", param_dtype="float32"))
  for name in TOWER_BUILDERS:
    c[name] = TOWER_BUILDERS[name]()
  c.update(overrides)
  return c


def base_config(model) -> ml_collections.ConfigDict:
  """Top-level config around a model config: mesh, rules, seed (train/data sections join them later)."""
  return ml_collections.ConfigDict(dict(
      model=model, seed=0,
      mesh=dict(data=1, fsdp=-1, tensor=1, expert=1),
      rules=None,
  ))


def image_tokens(model) -> int:
  """Visual positions of the variant: 291 x views with the Q-Former (SPHINX), 259 x views without (Tiny)."""
  qformer = model.qformer.num_query_tokens if "qformer" in model.towers else 0
  grid = (model.dinov2.image_size // model.dinov2.patch) ** 2 if "dinov2" in model.towers else 256
  return model.views * (2 + qformer + 1 + grid)


def _check(cond, field, message):
  if not cond:
    raise SphinxError(f"config.{field}: {message}")


def validate(config, num_devices: int | None = None) -> None:
  """Rejects inconsistent settings before anything is traced; the message names the field at fault."""
  model = config.model
  llm = model.llm
  _check(llm.dim % llm.n_heads == 0, "model.llm.n_heads", f"{llm.n_heads} heads do not divide dim {llm.dim}; "
         "choose n_heads dividing dim.")
  _check(llm.n_heads % llm.n_kv_heads == 0, "model.llm.n_kv_heads",
         f"{llm.n_kv_heads} KV heads do not divide {llm.n_heads} query heads; choose a divisor.")
  _check(llm.remat_policy in REMAT_POLICIES, "model.llm.remat_policy",
         f"unknown policy {llm.remat_policy!r}; use one of {REMAT_POLICIES}.")
  _check(llm.attention in ATTENTION_BACKENDS, "model.llm.attention",
         f"unknown backend {llm.attention!r}; use one of {ATTENTION_BACKENDS}.")
  unknown = [t for t in model.towers if t not in TOWER_BUILDERS]
  _check(not unknown, "model.towers", f"unknown tower(s) {unknown}; known: {sorted(TOWER_BUILDERS)}.")
  _check(model.views in (1, 5), "model.views", f"{model.views} views; SPHINX uses 1 or 5.")
  if model.towers:
    needed = image_tokens(model) + 1
    _check(llm.max_seq_len >= needed, "model.llm.max_seq_len",
           f"{llm.max_seq_len} is smaller than the {needed - 1} image tokens + BOS of this variant; raise it.")
  if num_devices is not None:
    from sphinx_jax.sharding import mesh_shape
    mesh_shape(config.mesh, num_devices)
