"""Training checkpoints keep the frozen params once per run (WORKDIR/frozen_params): the steps hold only the
trained ones, restore and export put both back, and a step saved with all its params (before this layout)
still restores."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sphinx_jax import checkpoint
from sphinx_jax import config as cfg
from sphinx_jax.errors import SphinxError
from sphinx_jax.train import checkpoints, export, optimizer as opt_lib, state as state_lib

SHAPES = {"llm/embed": (50, 16), "llm/norm/scale": (16,), "fusion/start_img": (1, 16),
          "towers/clip/kernel": (40, 12), "towers/clip/bias": (12,), "towers/dinov2/gamma": (12,)}
TOWERS = {p for p in SHAPES if p.startswith("towers/")}


def train_config():
  c = cfg.base_config(ml_collections.ConfigDict({"name": "toy"}))
  c.train.update(trainable="stage2", num_steps=10, warmup_steps=2)
  return c


@pytest.fixture()
def run(tmp_path):
  """(manager, a trained state whose every leaf is random, its config): no step saved yet."""
  config = train_config()
  rng = np.random.default_rng(0)
  params = checkpoint.unflatten({p: jnp.asarray(rng.standard_normal(s), jnp.float32) for p, s in SHAPES.items()})
  tx, _ = opt_lib.make_optimizer(params, config.train)
  state = state_lib.create(params, tx)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
  for _ in range(2):  # moments and step count away from their initial values
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(params=jax.tree.map(jnp.add, state.params, updates), opt_state=opt_state,
                          step=state.step + 1)
  return checkpoints.manager(tmp_path / "run", async_save=False), state, config


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def assert_same(got, want):
  got, want = checkpoint.flatten(got), checkpoint.flatten(want)
  assert set(got) == set(want)
  for path in want:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)


def saved_params(mgr, step):
  state = checkpoints.step_dir(mgr, step) / "state"
  return {p[len("params/"):] for p in checkpoint.orbax_shapes(state) if p.startswith("params/")}


def test_the_stage_presets_freeze_the_towers():
  params = checkpoint.unflatten({p: 0 for p in SHAPES})
  assert opt_lib.frozen_leaves(params, "stage2") == TOWERS
  assert opt_lib.frozen_leaves(params, "all") == set()
  assert opt_lib.frozen_leaves(params, "mm_stage1") == set(SHAPES)  # the toy has no visual_proj


def test_steps_hold_the_trained_params_and_the_frozen_ones_are_written_once(run):
  mgr, state, config = run
  checkpoints.save_frozen(mgr, state.params, TOWERS)
  written = checkpoints.frozen_dir(mgr).stat().st_mtime_ns
  for step in (2, 4, 6, 8):
    checkpoints.save(mgr, step, state.replace(step=jnp.int32(step)), {"n": step}, config, TOWERS)
  mgr.wait_until_finished()
  assert mgr.all_steps() == [4, 6, 8]  # retention (keep 3)
  assert saved_params(mgr, 8) == set(SHAPES) - TOWERS
  assert set(checkpoint.orbax_shapes(checkpoints.frozen_dir(mgr))) == TOWERS
  assert checkpoints.frozen_dir(mgr).stat().st_mtime_ns == written
  restored, data_state, restored_config = checkpoints.restore(mgr, 6, abstract(state), TOWERS)
  assert_same(restored, state.replace(step=jnp.int32(6)))
  assert data_state == {"n": 6} and restored_config == config


def test_a_step_saved_with_all_its_params_still_restores(run, tmp_path):
  mgr, state, config = run
  checkpoints.save(mgr, 3, state, {}, config)  # the layout before WORKDIR/frozen_params
  mgr.wait_until_finished()
  assert saved_params(mgr, 3) == set(SHAPES) and not checkpoints.frozen_dir(mgr).exists()
  restored, _, _ = checkpoints.restore(mgr, 3, abstract(state), TOWERS)
  assert_same(restored, state)


def test_export_takes_the_frozen_params_from_their_directory(run, tmp_path):
  mgr, state, config = run
  checkpoints.save_frozen(mgr, state.params, TOWERS)
  checkpoints.save(mgr, 5, state, {}, config, TOWERS)
  mgr.wait_until_finished()
  out = export.export(tmp_path / "run", tmp_path / "model")
  assert_same(checkpoint.load_model_dir(out)[0], state.params)


def test_a_missing_frozen_directory_is_named(run, tmp_path):
  mgr, state, config = run
  checkpoints.save_frozen(mgr, state.params, TOWERS)
  checkpoints.save(mgr, 5, state, {}, config, TOWERS)
  mgr.wait_until_finished()
  checkpoints.frozen_dir(mgr).rename(tmp_path / "moved")
  with pytest.raises(SphinxError, match=r"run/frozen_params: missing"):
    checkpoints.restore(mgr, 5, abstract(state), TOWERS)
  with pytest.raises(SphinxError, match=r"run/frozen_params: missing; step 5"):
    export.export(tmp_path / "run", tmp_path / "model")
  assert not (tmp_path / "model").exists()


def test_another_frozen_set_is_refused(run):
  mgr, state, config = run
  checkpoints.save_frozen(mgr, state.params, TOWERS)
  checkpoints.save(mgr, 5, state, {}, config, TOWERS)
  mgr.wait_until_finished()
  with pytest.raises(SphinxError, match=r"saved with 3 frozen param leaves, but this config freezes 0 "
                                        r"\(config.train.trainable changed\?\)"):
    checkpoints.restore(mgr, 5, abstract(state), frozenset())


def test_a_frozen_write_killed_earlier_leaves_nothing_behind(run):
  mgr, state, _ = run
  stale = checkpoints.frozen_dir(mgr).parent / f"{checkpoints.FROZEN_DIR}.orbax-checkpoint-tmp"
  stale.mkdir(parents=True)
  (stale / "partial").write_bytes(b"\0" * 64)
  checkpoints.save_frozen(mgr, state.params, TOWERS)
  assert sorted(p.name for p in checkpoints.frozen_dir(mgr).parent.iterdir()) == ["checkpoints", "frozen_params"]
  back = checkpoints.restore_frozen(mgr, checkpoints.split_params(abstract(state).params, TOWERS)[1])
  assert_same(back, checkpoints.split_params(state.params, TOWERS)[1])
