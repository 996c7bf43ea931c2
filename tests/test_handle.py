"""sphinx_jax.load: a model directory -> handle with params, config, tokenizer and jitted text logits, also
restored straight onto a device mesh. (Parity with transformers: tests/test_convert_hf_cli.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

import sphinx_jax
from configs.sphinx import get_config
from sphinx_jax import checkpoint, sharding
from sphinx_jax.errors import SphinxError
from sphinx_jax.models import sphinx as sphinx_model
from sphinx_jax.models.llama import Llama

from checkpoint_helpers import VOCAB, train_tokenizer

TOKENS = np.array([[1, 7, 99, 3, 120, 5], [1, 2, 4, 8, 16, 32]], np.int32)


def text_config():
  config = get_config("tiny_sphinx_tiny")
  config.model.towers = ()
  config.model.llm.vocab_size = VOCAB
  return config


def init(config):
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.jit(lambda t: Llama(config.model.llm).init(jax.random.key(3), t, positions=t))(tokens)["params"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("handle")
  config = text_config()
  params = {"llm": nn.meta.unbox(init(config))}
  checkpoint.save_model_dir(root / "m", params, config, tokenizer=train_tokenizer(root / "tokenizer.model"))
  return root / "m", params, config


def direct_logits(params, config, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return Llama(config.model.llm).apply({"params": params["llm"]}, tokens, positions=positions)[0]


def unscanned(config):
  """The config the handle reports: the checkpoint's, with the decoder unscanned."""
  config = config.copy_and_resolve_references()
  config.model.llm.scan_layers = False
  return config


def assert_layers_split(held, stacked, n_layers):
  """held['layers_i'] holds slice i of every stacked leaf, and nothing else is left of the stack."""
  assert "layers" not in held and sorted(k for k in held if k.startswith("layers_")) == [
      f"layers_{i}" for i in range(n_layers)]
  for i in range(n_layers):
    jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a, np.asarray(b)[i]),
                 jax.device_get(held[f"layers_{i}"]), stacked["layers"])
  rest = {k: v for k, v in stacked.items() if k != "layers"}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get({k: held[k] for k in rest}), rest)


def test_load_gives_params_config_tokenizer_and_logits(model_dir):
  path, params, config = model_dir
  handle = sphinx_jax.load(path)
  assert config.model.llm.scan_layers and handle.config == unscanned(config)
  assert_layers_split(handle.params["llm"], params["llm"], config.model.llm.n_layers)
  assert handle.tokenizer_path == path / "tokenizer.model"
  assert handle.tokenizer.n_words == VOCAB and handle.tokenizer.bos_id == 1
  logits = handle.logits(TOKENS)
  assert logits.shape == (2, 6, VOCAB) and logits.dtype == np.float32
  np.testing.assert_allclose(logits, direct_logits(params, config, TOKENS), rtol=1e-6, atol=1e-6)
  # Causal and aligned: a prefix scores the same as the start of the longer sequence.
  np.testing.assert_allclose(handle.logits(TOKENS[:, :3]), logits[:, :3], rtol=1e-5, atol=1e-5)


def live_bytes(exclude=frozenset()):
  return sum(a.nbytes for a in jax.live_arrays() if id(a) not in exclude)


def test_handle_holds_one_copy_of_the_decoder_and_generates_with_it(model_dir):
  path, params, config = model_dir
  before = {id(a) for a in jax.live_arrays()}
  handle = sphinx_jax.load(path)
  ids = handle.generator.generate_ids([[1, 7, 99]], max_new_tokens=3)
  # Device memory: exactly one copy of the parameters stays alive after loading and decoding (no stacked
  # checkpoint copy beside the unscanned one, no generator-side copy).
  param_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(params))
  assert live_bytes(before) == param_bytes
  generator = handle.generator
  assert not generator.model.config.llm.scan_layers
  held = jax.tree.leaves(handle.params["llm"])
  assert all(a is b for a, b in zip(jax.tree.leaves(generator.params["llm"]), held))
  # what it decodes is the greedy continuation under the handle's own scoring
  tokens = [1, 7, 99]
  for _ in range(3):
    tokens.append(int(np.argmax(handle.logits(np.array([tokens], np.int32))[0, -1])))
  assert ids == [tokens[3:]]


def test_logits_compile_once_per_shape(model_dir):
  handle = sphinx_jax.load(model_dir[0])
  handle.logits(TOKENS)
  handle.logits(TOKENS + 1)
  assert handle._logits._cache_size() == 1
  handle.logits(TOKENS[:1])
  assert handle._logits._cache_size() == 2


def test_bad_calls_are_one_line_errors(model_dir):
  handle = sphinx_jax.load(model_dir[0])
  with pytest.raises(SphinxError, match="this checkpoint has no vision towers"):
    handle.logits(TOKENS, images=np.zeros((2, 224, 224, 3), np.float32))
  with pytest.raises(SphinxError, match=r"tokens must be int\[B, T\], got int32\[6\]"):
    handle.logits(TOKENS[0])
  with pytest.raises(SphinxError, match=rf"token ids must lie in \[0, {VOCAB}\), got \[1, {VOCAB}\]"):
    handle.logits(np.array([[1, VOCAB]]))


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
  """A tiny SPHINX-Tiny directory (ConvNeXt + DINOv2 towers), every leaf random, plus an `extras` side tree."""
  config = get_config("tiny_sphinx_tiny")
  config.model.llm.vocab_size = VOCAB
  side = config.model.image_size
  shapes = jax.eval_shape(sphinx_model.Sphinx(config.model).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                          jnp.zeros((1, side, side, 3)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32),
                        nn.meta.unbox(shapes)["params"])
  path = tmp_path_factory.mktemp("vision") / "m"
  checkpoint.save_model_dir(path, dict(params, extras={"dinov2": {"mask_token": np.ones((1, 32), np.float32)}}),
                            config)
  return path, params, config


def test_image_conditioned_logits(vision_dir):
  path, params, config = vision_dir
  handle = sphinx_jax.load(path)
  side = config.model.image_size
  pixels = np.random.default_rng(1).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
  got = handle.logits(TOKENS, pixels)
  expected = jax.jit(sphinx_model.Sphinx(config.model).apply)({"params": params}, TOKENS, pixels)
  assert got.shape == (2, 6, VOCAB) and np.isfinite(got).all()
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  assert np.abs(got - handle.logits(TOKENS)).max() > 1e-3  # the image changes every text position's logits
  with pytest.raises(SphinxError, match=rf"images must be uint8 or float \[2, {side}, {side}, 3\]"):
    handle.logits(TOKENS, pixels[:, :224, :224])


def test_no_tokenizer_is_none(tmp_path, model_dir):
  _, params, config = model_dir
  checkpoint.save_model_dir(tmp_path / "m", params, config)
  handle = sphinx_jax.load(tmp_path / "m")
  assert handle.tokenizer is None and handle.tokenizer_path is None


def test_load_onto_a_mesh(model_dir):
  path, params, config = model_dir
  config = config.copy_and_resolve_references()
  config.mesh.fsdp, config.mesh.tensor = 4, 2
  mesh = sharding.make_mesh(config.mesh)
  tokens = jnp.zeros((1, 4), jnp.int32)
  boxed = jax.eval_shape(lambda: Llama(config.model.llm).init(jax.random.key(0), tokens, positions=tokens))
  shardings = {"llm": nn.meta.unbox(sharding.param_shardings(boxed, mesh, sharding.rules_from_config(config)))[
      "params"]}
  before = {id(a) for a in jax.live_arrays()}
  handle = sphinx_jax.load(path, shardings=shardings)
  assert live_bytes(before) == sum(np.asarray(a).nbytes for a in jax.tree.leaves(params))  # one copy stays
  for i in range(config.model.llm.n_layers):  # each layer keeps the restored sharding, minus the layer axis
    query = handle.params["llm"][f"layers_{i}"]["attention"]["query"]["kernel"]
    assert isinstance(query.sharding, NamedSharding) and query.sharding.spec == P("fsdp", "tensor")
    assert len({s.device for s in query.addressable_shards}) == 8
  assert_layers_split(handle.params["llm"], params["llm"], config.model.llm.n_layers)
  np.testing.assert_allclose(handle.logits(TOKENS), direct_logits(params, config, TOKENS), rtol=1e-5, atol=1e-5)
