"""`sphinx-jax export` of a run started from `train.init_from`: the trained parts come from the training
checkpoint, the init directory's side trees (`extras/…`, kept for the way back to LLaMA2-Accessory) are copied
unchanged; without the init directory the export refuses (or leaves them out when asked)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sphinx_jax import checkpoint
from sphinx_jax.errors import SphinxError
from sphinx_jax.train import checkpoints, export, state as state_lib

MODEL = {"llm/embed": ((50, 16), np.float32), "towers/clip/kernel": ((40, 12), np.float32)}
SIDE = {"extras/clip/text/token_embedding": ((64, 8), np.float32), "extras/dinov2/mask_token": ((1, 16), np.float32)}


def random_leaves(shapes, seed):
  rng = np.random.default_rng(seed)
  return {p: rng.standard_normal(shape).astype(dtype) for p, (shape, dtype) in shapes.items()}


@pytest.fixture()
def run(tmp_path):
  """(workdir, init dir, init leaves, trained leaves): one saved step of a run that started from `init`."""
  init_leaves = random_leaves({**MODEL, **SIDE}, seed=0)
  init = checkpoint.save_model_dir(tmp_path / "init", checkpoint.unflatten(init_leaves),
                                   ml_collections.ConfigDict({"model": {"name": "toy"}}))
  config = ml_collections.ConfigDict({"model": {"name": "toy"}, "train": {"init_from": str(init)}})
  trained = random_leaves(MODEL, seed=1)
  manager = checkpoints.manager(tmp_path / "run", async_save=False)
  state = state_lib.create(jax.tree.map(jnp.asarray, checkpoint.unflatten(trained)), optax.adam(1e-3))
  checkpoints.save(manager, 3, state, {}, config)
  manager.wait_until_finished()
  return tmp_path / "run", init, init_leaves, trained


def test_export_carries_the_side_trees_of_init_from(run, tmp_path):
  workdir, init, init_leaves, trained = run
  out = export.export(workdir, tmp_path / "model")
  back = checkpoint.flatten(checkpoint.load_model_dir(out)[0])
  assert set(back) == set(MODEL) | set(SIDE)
  for path in MODEL:
    np.testing.assert_array_equal(back[path], trained[path], err_msg=path)
  for path in SIDE:
    np.testing.assert_array_equal(back[path], init_leaves[path], err_msg=path)
  assert checkpoint.read_metadata(out)["provenance"]["side_trees_from"] == str(init)


def test_export_without_the_init_directory(run, tmp_path):
  workdir, init, _, _ = run
  init.rename(tmp_path / "moved")  # the directory the run started from was moved away
  with pytest.raises(SphinxError, match="init_from"):
    export.export(workdir, tmp_path / "refused")
  assert not (tmp_path / "refused").exists()
  out = export.export(workdir, tmp_path / "model", side_trees=False)
  assert set(checkpoint.flatten(checkpoint.load_model_dir(out)[0])) == set(MODEL)
