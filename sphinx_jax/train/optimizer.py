"""Optimizer of the original fine-tuning code (accessory/main_finetune.py), as optax transforms over param paths.

- Trainable groups by path regex (stage presets): frozen leaves get `optax.set_to_zero()` (no optimizer state)
  and stay bit-identical.
- AdamW (b1 0.9, b2 0.95); weight decay on every trainable leaf except biases and RMSNorm weights — the original
  skips names ending in `.bias` or `norm.weight`, so the fusion LayerNorms (`visual_proj.1.weight`) ARE decayed;
  their leaf here is `norm/scale`, which the rule below decays too.
- Linear warm-up from 0 then half-cosine to `min_lr` (the original's per-fractional-epoch rule, in steps).
- Global-norm clipping and gradient accumulation (optax.MultiSteps).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from sphinx_jax.errors import SphinxError

TRAINABLE_PRESETS = {
    "stage1": (r"llm/.*", r"fusion/.*"),
    "stage2": (r"llm/.*", r"fusion/.*"),
    "mm_stage1": (r"fusion/visual_proj/.*",),
    "llm": (r"llm/.*",),  # text-only training of the decoder
    "all": (r"llm/.*", r"fusion/.*", r"towers/.*"),  # random-init towers (the demo); needs model.train_towers
}


def path_labels(params, patterns: Sequence[str], *, matched="train", unmatched="frozen"):
  """Pytree of labels: `matched` where the '/'-joined path fully matches one of `patterns`."""
  compiled = [re.compile(p) for p in patterns]
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {path: matched if any(c.fullmatch(path) for c in compiled) else unmatched for path in flat}
  return traverse_util.unflatten_dict(labels, sep="/")


def frozen_leaves(params, trainable: str) -> frozenset[str]:
  """'/'-joined paths of the leaves that preset `trainable` leaves frozen (the optimizer's `frozen` label)."""
  labels = traverse_util.flatten_dict(path_labels(params, TRAINABLE_PRESETS[trainable]), sep="/")
  return frozenset(path for path, label in labels.items() if label == "frozen")


def decay_mask(params):
  """True where weight decay applies: not a bias, not an RMSNorm weight (a `weight` leaf under `*norm`)."""
  def decays(path):
    leaf, parent = path[-1], (path[-2] if len(path) > 1 else "")
    return not (leaf == "bias" or (leaf == "weight" and parent.endswith("norm")))
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({path: decays(path) for path in flat})


def warmup_cosine(lr: float, min_lr: float, warmup_steps: int, total_steps: int):
  """lr(step): step/warmup * lr during warm-up, then min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * progress))."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = lr * step / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    cosine = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine)
  return schedule


def make_optimizer(params, train_config):
  """optax transform for `params` under `train_config` (lr, min_lr, warmup_steps, num_steps, weight_decay,
  b1, b2, eps, clip_grad, accum_steps, trainable: a TRAINABLE_PRESETS name)."""
  c = train_config
  if c.trainable not in TRAINABLE_PRESETS:
    raise SphinxError(f"config.train.trainable={c.trainable!r}: use one of {sorted(TRAINABLE_PRESETS)}.")
  trainable = TRAINABLE_PRESETS[c.trainable]
  schedule = warmup_cosine(c.lr, c.min_lr, c.warmup_steps, c.num_steps)
  adamw = optax.chain(
      optax.clip_by_global_norm(c.clip_grad) if c.clip_grad else optax.identity(),
      optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask),
  )
  tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                             path_labels(params, trainable))
  if c.accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=c.accum_steps)
  return tx, schedule


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
