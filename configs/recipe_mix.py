"""SPHINX's domain weight mix (SPHINX.md §8) on the synthetic world: "real" = the flat domain, "synthetic" =
the textured one, the tiny demo model of configs/demo.py. β is not published; choose it at the mix step.

  1. sphinx-jax train --config configs/recipe_mix.py:real --workdir runs/real \
       --config.train.export_to=runs/real/model
  2. sphinx-jax train --config configs/recipe_mix.py:synthetic --workdir runs/synthetic \
       --config.train.init_from=runs/real/model --config.train.export_to=runs/synthetic/model
  3. sphinx-jax mix --out runs/mixed --inputs runs/real/model runs/synthetic/model --weights BETA 1-BETA
  4. sphinx-jax train --config configs/recipe_mix.py:stage2 --workdir runs/stage2 \
       --config.train.init_from=runs/mixed

Steps 1-2 are the pre-training stage (LLM, projections and image tags trained, towers frozen) on the
caption-like tasks, one domain each, the second starting from the first; step 3 interpolates the LLMs
(θ = β·θ_real + (1−β)·θ_syn, `llm/.*` only; towers and fusion come from the real-domain model); step 4 is the
multi-task instruction stage on both domains. `:<stage>,steps=N` shortens a stage (tests use a few steps).
"""
from sphinx_jax import config as cfg

from configs.demo import get_config as demo_config

STAGES = {  # stage -> (trainable preset, {world task: ratio}, domains)
    "real": ("stage1", {"grounded_caption": 0.7, "reg": 0.3}, ("flat",)),
    "synthetic": ("stage1", {"grounded_caption": 0.7, "reg": 0.3}, ("textured",)),
    "stage2": ("stage2", {"vqa": 0.5, "rec": 0.35, "reg": 0.15}, ("flat", "textured")),
}


def parse(arg: str) -> tuple[str, dict]:
  """'real' or 'real,steps=5' -> ('real', {'steps': 5})."""
  stage, *options = arg.split(",") if arg else ["real"]
  if stage not in STAGES:
    raise ValueError(f"configs/recipe_mix.py: unknown stage {stage!r}; choose one of {sorted(STAGES)}.")
  return stage, {k: int(v) for k, v in (o.split("=") for o in options)}


def get_config(arg: str = "real"):
  stage, options = parse(arg)
  trainable, mixture, domains = STAGES[stage]
  c = demo_config()
  c.data.datasets = {f"{task}_{domain}": cfg.dataset_config("synthetic", "", ratio / len(domains), task=task,
                                                            seed=0, domain=domain)
                     for task, ratio in mixture.items() for domain in domains}
  c.train.update(trainable=trainable, num_steps=options.get("steps", 400), eval_every=0,
                 checkpoint_every=options.get("steps", 400))
  if "steps" in options:  # a short run: no warm-up longer than the run itself
    c.train.warmup_steps = min(c.train.warmup_steps, max(1, options["steps"] // 2))
  c.eval.domain = domains[-1]
  return c
