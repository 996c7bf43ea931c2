"""Presets build and validate; validate() names the field at fault."""
import pytest

import configs.sphinx as presets
from sphinx_jax import config as cfg
from sphinx_jax.errors import SphinxError

RELEASED = sorted(presets.VARIANTS)


@pytest.mark.parametrize("name", RELEASED + [f"tiny_{n}" for n in RELEASED])
def test_every_preset_validates(name):
  c = presets.get_config(name)
  cfg.validate(c, num_devices=8)
  assert c.model.variant == name.removeprefix("tiny_")


@pytest.mark.parametrize("name, tokens", [("sphinx", 291), ("sphinx_1k", 1455), ("sphinx_tiny", 259),
                                          ("sphinx_tiny_1k", 1295), ("sphinx_moe", 291), ("sphinx_moe_1k", 1455)])
def test_image_tokens_match_the_original(name, tokens):
  assert cfg.image_tokens(presets.get_config(name).model) == tokens
  assert cfg.image_tokens(presets.get_config(f"tiny_{name}").model) == tokens


@pytest.mark.parametrize("name, hidden", [("sphinx", 13824), ("sphinx_tiny", 5632), ("sphinx_moe", 14336)])
def test_ffn_width_rule(name, hidden):
  assert cfg.ffn_hidden_dim(presets.get_config(name).model.llm) == hidden


@pytest.mark.parametrize("field, value, named", [
    ("model.llm.n_heads", 7, "model.llm.n_heads"),
    ("model.llm.n_kv_heads", 3, "model.llm.n_kv_heads"),
    ("model.llm.max_seq_len", 1000, "model.llm.max_seq_len"),
    ("model.towers", ("clip", "resnet"), "model.towers"),
    ("model.llm.remat_policy", "sometimes", "model.llm.remat_policy"),
    ("model.dinov2.patch", 28, "model.dinov2.patch"),
])
def test_validate_names_the_field(field, value, named):
  c = presets.get_config("sphinx_1k")
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(SphinxError, match=named.replace(".", r"\.")):
    cfg.validate(c)


def test_a_coarser_patch_shrinks_every_stream_to_its_grid():
  """Patch 28 on the 224-px views: an 8x8 grid for CLIP / DINOv2 and ConvNeXt's map, so 2 + 32 + 1 + 64 positions."""
  c = presets.get_config("tiny_sphinx")
  c.model.clip.patch = c.model.dinov2.patch = 28
  cfg.validate(c)
  assert cfg.image_tokens(c.model) == 99


def test_mesh_sizes_must_divide_devices():
  c = presets.get_config("tiny_sphinx")
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 3, -1, 1
  with pytest.raises(SphinxError, match="mesh"):
    cfg.validate(c, num_devices=8)


def test_trained_towers_need_both_switches():
  c = presets.get_config("tiny_sphinx")
  cfg.validate(c, training=True)
  c.train.trainable = "all"  # the preset alone would spend optimizer state on towers behind stop_gradient
  with pytest.raises(SphinxError, match="model.train_towers"):
    cfg.validate(c, training=True)
  cfg.validate(c)  # inference does not care
  c.model.train_towers = True
  cfg.validate(c, training=True)
  c.train.trainable = "stage2"  # the flag alone would fold unused tower gradients into the clipping norm
  with pytest.raises(SphinxError, match="model.train_towers"):
    cfg.validate(c, training=True)


def test_unknown_preset_is_named():
  with pytest.raises(ValueError, match="sphinx_2k"):
    presets.get_config("sphinx_2k")
