"""The demo's trainer (towers frozen, stage 2) keeps the towers once per run in WORKDIR/frozen_params: its step
checkpoints hold only the trained params, a run stopped and started again continues bit for bit, and the export
carries the towers of `train.towers_from` unchanged."""
import numpy as np
import pytest

from configs.demo import ASSETS
from sphinx_jax import checkpoint
from sphinx_jax.train import checkpoints

from train_helpers import losses, run_train

STEPS = 6

pytestmark = pytest.mark.slow  # three trainer subprocesses of the demo's model: the second CI stage


def demo_args(workdir, *overrides):
  return ["-m", "sphinx_jax", "train", "--config", "configs/demo.py", "--workdir", str(workdir),
          f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.eval_at_start=False", "--config.data.global_batch_size=2",
          "--config.data.num_workers=1", *overrides]


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
