"""notebooks/explore_sphinx.ipynb runs headless (nbclient, a real kernel) on two tiny random SPHINX
checkpoints and saves its figures; the committed notebook carries no outputs."""
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import nbformat
import numpy as np
import pytest
from flax import linen as nn
from nbclient import NotebookClient
from PIL import Image

from configs.sphinx import get_config
from sphinx_jax import checkpoint
from sphinx_jax.models import sphinx as sphinx_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "explore_sphinx.ipynb"
FIGURES = ("grounding", "detection", "keypoints", "caption", "features")


def random_model_dir(path: Path, seed: int) -> Path:
  config = get_config("tiny_sphinx_tiny")
  config.model.update(image_size=224)
  config.model.llm.vocab_size = 768
  shapes = jax.eval_shape(sphinx_model.Sphinx(config.model).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                          jnp.zeros((1, 224, 224, 3)))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                        nn.meta.unbox(shapes)["params"])
  return checkpoint.save_model_dir(path, params, config, tokenizer=ROOT / "configs/assets/demo_tokenizer.model")


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert 'os.environ.get("SPHINX_CKPT"' in code[0].source  # the first code cell holds the parameters


@pytest.mark.slow
def test_notebook_runs_and_saves_figures(tmp_path, monkeypatch):
  a, b = random_model_dir(tmp_path / "a", 0), random_model_dir(tmp_path / "b", 1)
  figures = tmp_path / "figures"
  for key, value in {"SPHINX_CKPT": a, "SPHINX_CKPT_B": b, "SPHINX_FIGURES": figures, "SPHINX_MAX_NEW_TOKENS": 8,
                     "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}.items():
    monkeypatch.setenv(key, str(value))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  for name in FIGURES:
    with Image.open(figures / f"{name}.png") as figure:
      assert figure.size == ((224, 224) if name == "features" else (320, 200))
  with Image.open(figures / "features.png") as features:  # principal components vary over the patches
    assert len(np.unique(np.asarray(features).reshape(-1, 3), axis=0)) > 16
  text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
  assert "Q: What is in the image?" in text and "mix (beta=0.5):" in text
