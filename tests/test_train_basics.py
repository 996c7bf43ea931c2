"""Optimizer groups, decay rule, schedule and loss against direct computations."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sphinx_jax.train import loss as loss_lib
from sphinx_jax.train import optimizer as opt


def tiny_params():
  rng = np.random.default_rng(0)
  return {
      "llm": {"layers": {"attention_norm": {"weight": rng.normal(size=(4,)).astype(np.float32)},
                         "attention": {"query": {"kernel": rng.normal(size=(4, 4)).astype(np.float32)}}},
              "final_norm": {"weight": rng.normal(size=(4,)).astype(np.float32)}},
      "fusion": {"visual_proj": {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                                           "bias": rng.normal(size=(4,)).astype(np.float32)},
                                 "norm": {"scale": rng.normal(size=(4,)).astype(np.float32)}}},
      "towers": {"clip": {"proj": {"kernel": rng.normal(size=(4, 4)).astype(np.float32)}}},
  }


def train_config(**kw):
  base = dict(lr=1e-2, min_lr=1e-3, warmup_steps=2, num_steps=10, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
              clip_grad=1.0, accum_steps=1, trainable="stage2")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_decay_mask_follows_the_original_names():
  mask = opt.decay_mask(tiny_params())
  assert mask["llm"]["layers"]["attention_norm"]["weight"] is False      # `norm.weight`: no decay
  assert mask["llm"]["final_norm"]["weight"] is False
  assert mask["fusion"]["visual_proj"]["dense"]["bias"] is False          # `.bias`: no decay
  assert mask["fusion"]["visual_proj"]["norm"]["scale"] is True           # `visual_proj.1.weight`: decayed
  assert mask["llm"]["layers"]["attention"]["query"]["kernel"] is True


def test_frozen_towers_stay_bit_identical_and_carry_no_state():
  params = tiny_params()
  tx, _ = opt.make_optimizer(params, train_config(warmup_steps=0))
  state = tx.init(params)
  state_leaves = jax.tree.leaves(state)
  n_trainable = sum(x.size for k, x in jax.tree_util.tree_leaves_with_path(params)
                    if "towers" not in jax.tree_util.keystr(k))
  # Adam moments (2 per trainable element) + scalar counters; nothing for the frozen tower.
  assert sum(np.size(x) for x in state_leaves) - 2 * n_trainable < 8
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new["towers"]["clip"]["proj"]["kernel"], params["towers"]["clip"]["proj"]["kernel"])
  assert not np.array_equal(new["llm"]["final_norm"]["weight"], params["llm"]["final_norm"]["weight"])


def test_mm_stage1_trains_only_visual_proj():
  params = tiny_params()
  tx, _ = opt.make_optimizer(params, train_config(trainable="mm_stage1", warmup_steps=0))
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  changed = {jax.tree_util.keystr(k) for k, u in jax.tree_util.tree_leaves_with_path(updates) if np.any(u != 0)}
  assert changed and all("visual_proj" in k for k in changed)


def test_schedule_warmup_then_half_cosine():
  s = opt.warmup_cosine(1.0, 0.1, 4, 12)
  for step, expected in [(0, 0.0), (2, 0.5), (4, 1.0), (8, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))),
                         (12, 0.1), (20, 0.1)]:
    assert float(s(step)) == pytest.approx(expected, abs=1e-6)


def test_loss_is_mean_over_labelled_targets():
  """The head's logits (hidden @ head) at t against token t+1, averaged over the labelled targets only."""
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(2, 5, 3)).astype(np.float32)
  head = rng.normal(size=(3, 7)).astype(np.float32)
  logits = hidden.astype(np.float64) @ head
  tokens = rng.integers(0, 7, size=(2, 5))
  mask = np.array([[0, 0, 1, 1, 0], [0, 1, 0, 0, 1]], bool)
  loss, metrics = loss_lib.next_token_loss(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(tokens),
                                           jnp.asarray(mask))
  nll = []
  for b in range(2):
    for t in range(1, 5):
      if mask[b, t]:
        z = logits[b, t - 1].astype(np.float64)
        nll.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[b, t]])
  assert float(loss) == pytest.approx(np.mean(nll), rel=1e-5)
  assert float(metrics["tokens"]) == 4
