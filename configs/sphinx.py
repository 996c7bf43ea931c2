"""SPHINX presets: every released variant and a tiny CPU twin of each.

Run:   sphinx-jax train --config configs/sphinx.py:sphinx_1k --workdir DIR [--config.model.llm.n_layers=2 ...]
Names: sphinx, sphinx_1k, sphinx_v2_1k, sphinx_tiny, sphinx_tiny_1k, sphinx_moe, sphinx_moe_1k, and tiny_<name>
for each (same structure: towers, views, image sizes, token counts; small widths and depths).
Facts: ../shared/SPHINX.md §1-§4.
"""
from sphinx_jax import config as cfg

ALL_TOWERS = ("qformer", "clip", "convnext", "dinov2")
LIGHT_TOWERS = ("convnext", "dinov2")

# released name -> what differs from the shared base in sphinx_jax/config.py
VARIANTS = {
    "sphinx": dict(llm="llama2_13b", image_size=224, views=1, towers=ALL_TOWERS, convnext_input=256),
    "sphinx_1k": dict(llm="llama2_13b", image_size=448, views=5, towers=ALL_TOWERS, convnext_input=256),
    "sphinx_v2_1k": dict(llm="llama2_13b", image_size=448, views=5, towers=ALL_TOWERS, convnext_input=256),
    "sphinx_tiny": dict(llm="tinyllama", image_size=512, views=1, towers=LIGHT_TOWERS, convnext_input=512),
    "sphinx_tiny_1k": dict(llm="tinyllama", image_size=1024, views=5, towers=LIGHT_TOWERS, convnext_input=512),
    "sphinx_moe": dict(llm="mixtral", image_size=512, views=1, towers=ALL_TOWERS, convnext_input=512),
    "sphinx_moe_1k": dict(llm="mixtral", image_size=1024, views=5, towers=ALL_TOWERS, convnext_input=512),
}

# LLaMA2-Accessory `llama_type` (meta.json) of each released variant.
LLAMA_TYPES = {
    "sphinx": "llama_ens", "sphinx_1k": "llama_ens5", "sphinx_v2_1k": "llama_ens5",
    "sphinx_tiny": "llama_ens_light", "sphinx_tiny_1k": "llama_ens5_light",
    "sphinx_moe": "mixtral_sparse_ens", "sphinx_moe_1k": "mixtral_sparse_ens5",
}

LLMS = {"llama2_13b": cfg.llm_config, "tinyllama": cfg.tinyllama_config, "mixtral": cfg.mixtral_config}

# Tiny twins keep every structural choice (GQA ratio, MoE, towers, views, token counts) at CPU size.
TINY_LLMS = {
    "llama2_13b": lambda: cfg.llm_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=32),
    "tinyllama": lambda: cfg.tinyllama_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32),
    "mixtral": lambda: cfg.mixtral_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                                          moe=dict(num_experts=4, top_k=2, load_balancing_weight=0.0)),
}


def tiny_towers(convnext_input):
  return dict(
      clip=cfg.clip_config(width=64, layers=2, heads=4, mlp_dim=256, embed_dim=32,
                           text=dict(vocab=64, context=77, width=32)),
      convnext=cfg.convnext_config(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), input_size=convnext_input),
      dinov2=cfg.dinov2_config(width=32, depth=2, heads=2, mlp_hidden=64),
      qformer=cfg.qformer_config(vision=dict(width=48, layers=2, heads=4, mlp_dim=96, patch=14, image_size=224,
                                             eps=1e-6),
                                 qformer=dict(hidden=64, layers=2, heads=4, intermediate=128,
                                              cross_attention_frequency=2, eps=1e-12)),
  )


def variant_config(name: str):
  tiny = name.startswith("tiny_")
  released = name[len("tiny_"):] if tiny else name
  if released not in VARIANTS:
    names = sorted(VARIANTS) + sorted(f"tiny_{v}" for v in VARIANTS)
    raise ValueError(f"configs/sphinx.py: unknown preset {name!r}; choose one of {names}.")
  v = VARIANTS[released]
  llm = (TINY_LLMS if tiny else LLMS)[v["llm"]]()
  towers = tiny_towers(v["convnext_input"]) if tiny else dict(
      convnext=cfg.convnext_config(input_size=v["convnext_input"]))
  model = cfg.model_config(llm, v["towers"], v["image_size"], v["views"], **towers)
  model.variant = released
  model.llama_type = LLAMA_TYPES[released]
  if tiny:
    model.dtype = "float32"
  return cfg.base_config(model)


def get_config(arg: str = "sphinx"):
  return variant_config(arg or "sphinx")
