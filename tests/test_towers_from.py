"""`train.towers_from` / `train.llm_from`: the `towers` / `llm` tree of a model directory replaces the initial one
(the rest keeps its own init); trees of another size or with a tower missing are refused with the key and the leaf
named."""
import jax
import numpy as np
import pytest
from flax import linen as nn

from checkpoint_helpers import assert_same_tree
from configs.sphinx import variant_config
from sphinx_jax import checkpoint
from sphinx_jax import sharding as sh
from sphinx_jax.convert.cli import set_layer_layout
from sphinx_jax.errors import SphinxError
from sphinx_jax.train import loop


def initial(c):
  mesh = sh.make_mesh(c.mesh, devices=jax.devices()[:1])
  rules = sh.rules_from_config(c)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    program = loop.build(c, mesh, rules)
    return jax.device_get(loop.initial_params(c, program.boxed_init, program.state_shardings.params))


def tiny(seed=0, **train):
  c = variant_config("tiny_sphinx")
  c.seed = seed
  c.train.update(train)
  return c


def save_part(path, params, part, c):
  return checkpoint.save_model_dir(path, {part: params[part]}, c)


@pytest.fixture(scope="module")
def donor(tmp_path_factory):
  """(params of seed 1, a model directory holding their towers)."""
  params = initial(tiny(seed=1))
  return params, str(save_part(tmp_path_factory.mktemp("towers") / "donor", params, "towers", tiny(seed=1)))


def test_towers_come_from_the_directory_and_the_rest_from_the_fresh_init(donor):
  donor, path = donor
  fresh = initial(tiny(seed=0))
  loaded = initial(tiny(seed=0, towers_from=path))
  assert_same_tree(loaded["towers"], donor["towers"])
  assert_same_tree({k: v for k, v in loaded.items() if k != "towers"},
                     {k: v for k, v in fresh.items() if k != "towers"})
  assert not np.array_equal(fresh["towers"]["clip"]["patch_embed"]["kernel"],
                            donor["towers"]["clip"]["patch_embed"]["kernel"])


def test_towers_of_another_width_are_refused_naming_the_leaf(donor, tmp_path):
  params, _ = donor
  towers = checkpoint.flatten(params["towers"])
  leaf = next(p for p in towers if p.startswith("dinov2/") and p.endswith("kernel"))
  towers[leaf] = np.zeros(towers[leaf].shape[:-1] + (towers[leaf].shape[-1] + 1,), towers[leaf].dtype)
  path = save_part(tmp_path / "wider", {"towers": checkpoint.unflatten(towers)}, "towers", tiny(seed=1))
  with pytest.raises(SphinxError, match=rf"config\.train\.towers_from=.*towers/{leaf} has shape"):
    initial(tiny(towers_from=str(path)))


def test_a_missing_tower_is_refused(donor, tmp_path):
  params, _ = donor
  towers = {k: v for k, v in params["towers"].items() if k != "qformer"}
  path = save_part(tmp_path / "three", {"towers": towers}, "towers", tiny(seed=1))
  with pytest.raises(SphinxError, match=r"towers_from=.*missing \['towers/qformer/"):
    initial(tiny(towers_from=str(path)))


def test_the_decoder_comes_from_its_directory_and_the_rest_from_the_fresh_init(donor, tmp_path):
  params, _ = donor
  path = str(save_part(tmp_path / "llm", params, "llm", tiny(seed=1)))
  fresh, loaded = initial(tiny(seed=0)), initial(tiny(seed=0, llm_from=path))
  assert_same_tree(loaded["llm"], params["llm"])
  assert_same_tree({k: v for k, v in loaded.items() if k != "llm"}, {k: v for k, v in fresh.items() if k != "llm"})
  assert not np.array_equal(fresh["llm"]["lm_head"]["kernel"], params["llm"]["lm_head"]["kernel"])


def test_both_parts_from_directories_leave_only_the_fusion_fresh(donor, tmp_path):
  params, path = donor
  llm = str(save_part(tmp_path / "llm", params, "llm", tiny(seed=1)))
  fresh, loaded = initial(tiny(seed=0)), initial(tiny(seed=0, towers_from=path, llm_from=llm))
  assert_same_tree({k: loaded[k] for k in ("llm", "towers")}, {k: params[k] for k in ("llm", "towers")})
  assert_same_tree(loaded["fusion"], fresh["fusion"])


def test_a_decoder_of_another_width_is_refused_naming_the_leaf(donor, tmp_path):
  params, _ = donor
  llm = checkpoint.flatten(params["llm"])
  leaf = next(p for p in llm if p.endswith("kernel"))
  llm[leaf] = np.zeros(llm[leaf].shape[:-1] + (llm[leaf].shape[-1] + 1,), llm[leaf].dtype)
  path = save_part(tmp_path / "wider", {"llm": checkpoint.unflatten(llm)}, "llm", tiny(seed=1))
  with pytest.raises(SphinxError, match=rf"config\.train\.llm_from=.*llm/{leaf} has shape"):
    initial(tiny(llm_from=str(path)))


@pytest.mark.parametrize("donor_scan", [True, False])
def test_a_decoder_of_the_other_layer_layout_fits(donor, tmp_path, donor_scan):
  """A scanned export starts an unscanned model and back (train/stored.py), the same values in each layer."""
  params, _ = donor
  layout = set_layer_layout(params["llm"], tiny().model.llm.n_layers, donor_scan)
  path = str(save_part(tmp_path / "llm", {"llm": layout}, "llm", tiny(seed=1)))
  model = tiny(seed=0, llm_from=path)
  model.model.llm.scan_layers = not donor_scan
  loaded = initial(model)["llm"]
  assert ("layers" in loaded) == (not donor_scan)
  assert_same_tree(loaded, set_layer_layout(params["llm"], model.model.llm.n_layers, not donor_scan))


def test_a_stack_deeper_than_the_model_is_refused(donor, tmp_path):
  params, _ = donor
  stacked = set_layer_layout(params["llm"], tiny().model.llm.n_layers, True)
  path = str(save_part(tmp_path / "llm", {"llm": stacked}, "llm", tiny(seed=1)))
  model = tiny(llm_from=path)
  model.model.llm.update(scan_layers=False, n_layers=model.model.llm.n_layers - 1)
  with pytest.raises(SphinxError, match=r"llm_from=.*llm/layers/.* holds \d+ layers, this model \d+"):
    initial(model)
