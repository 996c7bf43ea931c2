"""checkpoint.py model directories: exact config round trip, atomic writes, metadata-only shapes, partial
restore, and restore onto a device mesh."""
import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import sphinx as presets
from sphinx_jax import checkpoint
from sphinx_jax.errors import SphinxError


def tree():
  rng = np.random.default_rng(0)
  return {"llm": {"embed": {"embedding": rng.normal(size=(16, 8)).astype(np.float32)},
                  "layers": {"mlp": {"up": {"kernel": rng.normal(size=(2, 8, 24)).astype(ml_dtypes.bfloat16)}}},
                  "step_count": np.arange(4, dtype=np.int32)}}


@pytest.mark.parametrize("name", sorted(presets.VARIANTS) + [f"tiny_{v}" for v in sorted(presets.VARIANTS)])
def test_every_preset_config_round_trips_exactly(name):
  config = presets.get_config(name)
  back = checkpoint.config_from_json(json.loads(json.dumps(checkpoint.config_to_json(config))))
  assert back == config
  assert back.model.llm == config.model.llm
  assert isinstance(back.model.towers, tuple) and isinstance(back.model.convnext.depths, tuple)


def test_unserialisable_config_value_is_named():
  config = presets.get_config("tiny_sphinx")
  config.model.llm.frozen = {"towers/.*"}
  with pytest.raises(SphinxError, match=r"config\.model\.llm\.frozen: a set cannot be saved as JSON"):
    checkpoint.config_to_json(config)


def test_save_load_values_dtypes_metadata(tmp_path):
  config = presets.get_config("tiny_sphinx")
  (tmp_path / "spm.model").write_bytes(b"not checked here")
  checkpoint.save_model_dir(tmp_path / "m", tree(), config, tokenizer=tmp_path / "spm.model",
                            metadata={"source": "/x", "source_kind": "hf"})
  params, back, tokenizer = checkpoint.load_model_dir(tmp_path / "m")
  jax.tree.map(np.testing.assert_array_equal, params, tree())
  assert jax.tree.map(lambda a: a.dtype, params) == jax.tree.map(lambda a: a.dtype, tree())
  assert back == config and tokenizer.read_bytes() == b"not checked here"
  meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
  assert meta["format"] == "sphinx_jax.model" and meta["version"] == 1
  assert meta["provenance"] == {"source": "/x", "source_kind": "hf"} and meta["tool"].startswith("sphinx-jax ")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "spm.model"]


def test_abstract_params_partial_restore_and_damage(tmp_path):
  checkpoint.save_model_dir(tmp_path / "m", tree(), presets.get_config("tiny_sphinx"))
  shapes = checkpoint.abstract_params(tmp_path / "m")
  assert {k: (v.shape, v.dtype.name) for k, v in shapes.items()} == {
      "llm/embed/embedding": ((16, 8), "float32"), "llm/layers/mlp/up/kernel": ((2, 8, 24), "bfloat16"),
      "llm/step_count": ((4,), "int32")}
  leaves = checkpoint.restore_leaves(tmp_path / "m", ["llm/layers/mlp/up/kernel"])
  assert list(leaves) == ["llm/layers/mlp/up/kernel"]
  np.testing.assert_array_equal(leaves["llm/layers/mlp/up/kernel"], tree()["llm"]["layers"]["mlp"]["up"]["kernel"])
  with pytest.raises(SphinxError, match=r"no parameter\(s\) \['llm/nope'\]"):
    checkpoint.restore_leaves(tmp_path / "m", ["llm/nope"])
  # Lose the array store (OCDBT data): a one-line error naming the params directory, not a traceback.
  shutil.rmtree(tmp_path / "m" / "params" / "d")
  with pytest.raises(SphinxError, match=rf"^{tmp_path / 'm' / 'params'}: unreadable Orbax metadata .* damaged"):
    checkpoint.load_model_dir(tmp_path / "m")


def test_restore_onto_a_mesh(tmp_path):
  checkpoint.save_model_dir(tmp_path / "m", tree(), presets.get_config("tiny_sphinx"))
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
  shardings = {"llm": {"embed": {"embedding": NamedSharding(mesh, P("fsdp", "tensor"))},
                       "layers": {"mlp": {"up": {"kernel": NamedSharding(mesh, P(None, "tensor", "fsdp"))}}},
                       "step_count": NamedSharding(mesh, P())}}
  params, _, _ = checkpoint.load_model_dir(tmp_path / "m", shardings)
  kernel = params["llm"]["layers"]["mlp"]["up"]["kernel"]
  assert kernel.sharding == shardings["llm"]["layers"]["mlp"]["up"]["kernel"]
  assert kernel.addressable_shards[0].data.shape == (2, 4, 6)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, tree())
  with pytest.raises(SphinxError, match="shardings do not match"):
    checkpoint.load_model_dir(tmp_path / "m", {"llm": shardings["llm"]["embed"]})


def test_failed_write_leaves_nothing_and_overwrite_replaces(tmp_path, monkeypatch):
  config = presets.get_config("tiny_sphinx")

  def broken(path, obj):
    raise RuntimeError("disk full")

  with monkeypatch.context() as m:
    m.setattr(checkpoint, "write_json", broken)
    with pytest.raises(RuntimeError, match="disk full"):
      checkpoint.save_model_dir(tmp_path / "m", tree(), config)
  assert list(tmp_path.iterdir()) == []
  checkpoint.save_model_dir(tmp_path / "m", tree(), config)
  with pytest.raises(SphinxError, match="exists and is not empty"):
    checkpoint.save_model_dir(tmp_path / "m", {"llm": {"w": np.ones(3, np.float32)}}, config)
  checkpoint.save_model_dir(tmp_path / "m", {"llm": {"w": np.ones(3, np.float32)}}, config, overwrite=True)
  assert list(checkpoint.abstract_params(tmp_path / "m")) == ["llm/w"]
  assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_not_a_model_dir_and_future_version(tmp_path):
  with pytest.raises(SphinxError, match="not a sphinx_jax model directory"):
    checkpoint.load_model_dir(tmp_path)
  checkpoint.save_model_dir(tmp_path / "m", tree(), presets.get_config("tiny_sphinx"))
  meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
  (tmp_path / "m" / "metadata.json").write_text(json.dumps(dict(meta, version=99)))
  with pytest.raises(SphinxError, match="format version 99 is newer"):
    checkpoint.load_model_dir(tmp_path / "m")
