"""Sharding presets per (variant, TPU topology), chosen with `sphinx-jax compile` so that the step fits in HBM.

Run:   sphinx-jax compile --config configs/topologies.py:sphinx_1k@v5p-128 --topology v5p-128
       sphinx-jax train   --config configs/topologies.py:sphinx_1k@v5p-128 --workdir DIR   (on that slice)
A preset is the variant of configs/sphinx.py plus what differs on that slice: mesh sizes (per slice; -1 = the
rest), the decoder's remat policy, the per-call batch (data.global_batch_size) and gradient accumulation
(train.accum_steps: the optimizer applies the mean of that many calls), at data.max_len 4096.
The numbers each preset was checked with (memory per chip, compile time) are in BENCHMARKS.md.
MoE variants (sphinx_moe, sphinx_moe_1k) split the 8 Mixtral experts over the `expert` axis and each expert's
width over `fsdp` (expert x fsdp = 64 ways for the ~45B expert weights), dispatch tokens with all-to-all
(models/moe.py 'expert_parallel'), and shard the batch over `expert` as well (MOE_RULES) so that attention and the
towers are not repeated on every expert shard.
"""
from configs import sphinx as variants
from sphinx_jax import sharding as sh

# The default table with the batch split over the expert axis too (as MaxText's activation_batch rule).
MOE_RULES = tuple((name, ("data", "fsdp", "expert") if name == sh.BATCH else axes) for name, axes in sh.DEFAULT_RULES)
_MOE = dict(mesh=dict(data=1, fsdp=8, tensor=1, expert=8), remat_policy="full", global_batch_size=64, accum_steps=2,
            rules=MOE_RULES, dispatch="expert_parallel")

# (variant, topology) -> overrides of the variant's config.
PRESETS = {
    ("sphinx_1k", "v5p-128"): dict(mesh=dict(data=1, fsdp=-1, tensor=1, expert=1), remat_policy="full",
                                   global_batch_size=64, accum_steps=2),
    ("sphinx_1k", "v5e-256"): dict(mesh=dict(data=1, fsdp=-1, tensor=4, expert=1), remat_policy="full",
                                   global_batch_size=64, accum_steps=2),
    ("sphinx_moe", "v5p-128"): _MOE,
    ("sphinx_moe_1k", "v5p-128"): _MOE,
}


def get_config(arg: str = "sphinx_1k@v5p-128"):
  variant, _, topology = arg.partition("@")
  if (variant, topology) not in PRESETS:
    names = sorted(f"{v}@{t}" for v, t in PRESETS)
    raise ValueError(f"configs/topologies.py: no preset {arg!r}; choose one of {names}.")
  p = PRESETS[(variant, topology)]
  c = variants.get_config(variant)
  c.mesh.update(p["mesh"])
  c.model.llm.remat_policy = p["remat_policy"]
  c.data.global_batch_size = p["global_batch_size"]
  c.data.max_len = 4096
  c.train.accum_steps = p["accum_steps"]
  if "rules" in p:
    c.rules = p["rules"]
    c.model.llm.moe.dispatch = p["dispatch"]
  return c
