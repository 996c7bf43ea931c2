"""The demo's trainer (towers frozen, stage 2) keeps the towers once per run in WORKDIR/frozen_params: its step
checkpoints hold only the trained params, a run stopped and started again continues bit for bit, and the export
carries the towers of `train.towers_from` unchanged."""
import numpy as np
import pytest

from configs.demo import ASSETS
from sphinx_jax import checkpoint
from sphinx_jax.train import checkpoints

import train_helpers
from train_helpers import losses, run_train

STEPS = 6

pytestmark = pytest.mark.slow  # three trainer subprocesses of the demo's model: the second CI stage


def demo_args(workdir, *overrides):
  return train_helpers.demo_args(workdir, STEPS, *overrides)


def test_frozen_towers_are_kept_once_and_resume_exactly(tmp_path, monkeypatch):
  # the three runs compile one program: a persistent cache lets the later ones reuse it
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  reference, resumed = tmp_path / "reference", tmp_path / "resumed"
  run_train(demo_args(reference, f"--config.train.export_to={tmp_path / 'reference_model'}"), devices=1)
  saved = reference / "checkpoints"
  towers = {p for p in checkpoint.abstract_params(ASSETS / "demo_towers") if p.startswith("towers/")}
  assert towers and set(checkpoint.orbax_shapes(reference / checkpoints.FROZEN_DIR)) == towers
  in_step = {p for p in checkpoint.orbax_shapes(saved / str(STEPS) / "state") if p.startswith("params/")}
  assert in_step and not any(p.startswith("params/towers/") for p in in_step)

  run_train(demo_args(resumed, "--stop_after=3"), devices=1)  # saved at step 2, stopped after 3
  run_train(demo_args(resumed, f"--config.train.export_to={tmp_path / 'resumed_model'}"), devices=1)
  assert losses(resumed) == losses(reference) and sorted(losses(reference)) == list(range(1, STEPS + 1))

  model, want = (checkpoint.flatten(checkpoint.load_model_dir(tmp_path / name)[0])
                 for name in ("resumed_model", "reference_model"))
  assert set(model) == set(want)
  for path, leaf in want.items():
    np.testing.assert_array_equal(model[path], leaf, err_msg=path)
  start = checkpoint.restore_leaves(ASSETS / "demo_towers", sorted(towers))
  for path in towers:
    np.testing.assert_array_equal(model[path], start[path], err_msg=path)


def test_a_step_saved_with_all_its_params_resumes_and_moves_the_towers_out(tmp_path, monkeypatch):
  """A workdir whose step holds every param (the layout before WORKDIR/frozen_params): the same command resumes it
  bit for bit and writes the towers to frozen_params for the steps after."""
  import jax
  from flax import linen as nn
  from sphinx_jax import sharding as sh
  from sphinx_jax.config import load_config
  from sphinx_jax.train import loop, optimizer as opt_lib
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla"))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  reference, new, old = tmp_path / "reference", tmp_path / "new", tmp_path / "old"
  run_train(demo_args(reference), devices=1)
  run_train(demo_args(new, "--stop_after=2"), devices=1)  # saved at step 2 in the new layout

  args = demo_args(old)
  config = load_config(args[args.index("--config") + 1], [a for a in args if a.startswith("--config.")])
  mesh, rules = sh.make_mesh(config.mesh, devices=jax.devices()[:1]), sh.rules_from_config(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    program = loop.build(config, mesh, rules)
    frozen = opt_lib.frozen_leaves(program.abstract_state.params, config.train.trainable)
    state, data_state, saved_config = checkpoints.restore(checkpoints.manager(new), 2, program.placed_state(), frozen)
    mgr = checkpoints.manager(old, async_save=False)
    checkpoints.save(mgr, 2, state, data_state, saved_config)  # every param in the step, no frozen list
    mgr.wait_until_finished()
  (old / "metrics.jsonl").write_text((new / "metrics.jsonl").read_text())
  assert not (old / checkpoints.FROZEN_DIR).exists() and checkpoints.stored_frozen(old / "checkpoints" / "2") == []

  run_train(args, devices=1)
  assert losses(old) == losses(reference)
  assert set(checkpoint.orbax_shapes(old / checkpoints.FROZEN_DIR)) == frozen
  assert sorted(checkpoints.stored_frozen(old / "checkpoints" / str(STEPS))) == sorted(frozen)
