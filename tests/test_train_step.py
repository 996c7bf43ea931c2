"""The jitted train step on the whole tiny SPHINX: overfitting one batch drives the loss near zero, the frozen
towers stay bit-identical and carry no optimizer state, and a non-finite loss skips the update."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.demo import ASSETS
from configs.llama import get_config as llama_config
from configs.sphinx import variant_config
from sphinx_jax import compile as aot
from sphinx_jax import config as cfg
from sphinx_jax import sharding as sh
from sphinx_jax import topology
from sphinx_jax.data import conversation, image as image_lib, shapes
from sphinx_jax.data.tokenizer import Tokenizer
from sphinx_jax.train import loop, state as state_lib



def tiny_setup(steps):
  c = variant_config("tiny_sphinx")
  tok = Tokenizer.from_file(ASSETS / "demo_tokenizer.model")
  c.model.llm.update(vocab_size=tok.n_words, max_seq_len=512)
  c.train.update(lr=3e-3, min_lr=3e-3, warmup_steps=0, num_steps=steps, clip_grad=1.0)
  world = shapes.World(seed=3)
  words = cfg.image_tokens(c.model)
  rows = [world.sample(i, task)[1] for i, task in enumerate(("vqa", "rec"))]
  samples = [conversation.tokenize_dialog(tok, r.conversations, max_len=words + 96, image_words=words) for r in rows]
  batch = {"tokens": np.stack([s.tokens for s in samples]), "loss_mask": np.stack([s.loss_mask for s in samples]),
           "images": np.stack([image_lib.load_padded(r.image, c.model.image_size) for r in rows]),
           "has_image": np.ones(2, bool)}
  mesh = sh.make_mesh(c.mesh, devices=jax.devices()[:1])
  return c, mesh, batch


@contextlib.contextmanager
def built(c, mesh):
  """Under c's mesh and rules: (the trainer's program, fresh params)."""
  rules = sh.rules_from_config(c)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    program = loop.build(c, mesh, rules)
    yield program, loop.initial_params(c, program.boxed_init, program.state_shardings.params)


def fresh_state(program, params):
  return jax.jit(lambda p: state_lib.create(p, program.tx), out_shardings=program.state_shardings)(params)


@pytest.mark.slow
def test_overfit_one_batch_with_frozen_towers():
  c, mesh, batch = tiny_setup(steps=60)
  with built(c, mesh) as (program, params):
    towers_before = jax.device_get(params["towers"])
    state = fresh_state(program, params)
    batch = loop.to_global(batch, program.batch_sharding)
    first = None
    for _ in range(c.train.num_steps):
      state, metrics = program.step(state, batch)
      first = float(metrics["loss"]) if first is None else first
  assert first > 2.0 and float(metrics["loss"]) < 0.05, (first, float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["towers"]), towers_before)
  opt_paths = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
  assert not any("towers" in p for p in opt_paths)
  assert any("llm" in p for p in opt_paths) and any("fusion" in p for p in opt_paths)


@pytest.mark.slow  # ~90 s: compiling the backward pass through four towers
def test_trained_towers_get_updates_and_optimizer_state():
  """model.train_towers + the `all` preset (random-init towers, as in the demo): the image encoders move."""
  c, mesh, batch = tiny_setup(steps=1)
  c.model.train_towers, c.train.trainable = True, "all"
  cfg.validate(c, training=True)
  with built(c, mesh) as (program, params):
    before = jax.device_get(params["towers"])
    state = fresh_state(program, params)
    state, _ = program.step(state, loop.to_global(batch, program.batch_sharding))
  moved = {name: any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(tree)),
                                                              jax.tree.leaves(before[name])))
           for name, tree in state.params["towers"].items()}
  assert all(moved.values()), moved
  opt_paths = {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
  assert all(any(f"'{name}'" in p and "towers" in p for p in opt_paths) for name in moved)


def test_non_finite_loss_skips_the_update():
  c, mesh, batch = tiny_setup(steps=2)
  with built(c, mesh) as (program, params):
    params["fusion"]["start_img"] = jnp.full_like(params["fusion"]["start_img"], jnp.nan)
    state = fresh_state(program, params)
    before = jax.device_get(state.params["llm"])
    state, metrics = program.step(state, loop.to_global(batch, program.batch_sharding))
  assert int(metrics["skipped"]) == 1 and int(state.nonfinite_in_row) == 1 and int(state.nonfinite_total) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["llm"]), before)


def test_moe_load_balancing_loss_joins_the_objective():
  """A text-only Mixtral twin: the step's aux_loss is load_balancing_weight x the layers' mean balancing loss,
  and the loss is the cross-entropy plus it."""
  from configs.sphinx import TINY_LLMS
  from sphinx_jax.models import moe

  llm = TINY_LLMS["mixtral"]()
  llm.moe.load_balancing_weight = 0.25
  c = cfg.base_config(cfg.model_config(llm, (), 0, 1, dtype="float32"))
  c.train.update(warmup_steps=0, num_steps=1, trainable="llm")
  mesh = sh.make_mesh(c.mesh, devices=jax.devices()[:1])
  tokens = np.random.default_rng(0).integers(1, llm.vocab_size, (2, 12)).astype(np.int32)
  batch = {"tokens": tokens, "loss_mask": np.ones_like(tokens, bool)}
  with built(c, mesh) as (program, params):
    logits, sown = program.model.apply({"params": params}, tokens, mutable=["aux_loss"])
    balance = float(moe.load_balancing_loss(sown["aux_loss"]))
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    ce = -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))  # every target labelled
    _, metrics = program.step(fresh_state(program, params), loop.to_global(batch, program.batch_sharding))
  assert balance > 0
  np.testing.assert_allclose(float(metrics["aux_loss"]), 0.25 * balance, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss"]), float(ce), rtol=1e-5)  # the reported CE


def test_cpu_library_fusions_switch_reaches_the_compiler():
  """train.cpu_library_fusions off: the CPU step compiles with XLA's own dots, no YNNPACK fusion in the program."""
  texts = {}
  for fusions in (True, False):
    c = llama_config("tiny")
    c.train.cpu_library_fusions = fusions
    mesh, rules = sh.make_mesh(c.mesh, devices=jax.devices()[:1]), sh.rules_from_config(c)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):  # abstract state only: no params are made
      texts[fusions] = aot.lower_train(loop.build(c, mesh, rules), c)().compile().as_text()
  if "__ynn_fusion" not in texts[True]:
    pytest.skip("this XLA CPU build fuses nothing into YNNPACK here, so the switch has nothing to turn off")
  assert "__ynn_fusion" not in texts[False]


def test_cpu_library_fusions_leave_a_tpu_compile_alone():
  """The CPU option is not handed to the compile of another platform (`sphinx-jax compile` for a TPU topology)."""
  pytest.importorskip("libtpu")
  c = llama_config("tiny")
  c.train.cpu_library_fusions = False
  mesh = sh.make_mesh(c.mesh, devices=topology.describe("v5e-4").devices)
  assert loop.step_compiler_options(c.train, mesh) is None
  assert loop.step_compiler_options(c.train, sh.make_mesh(c.mesh, devices=jax.devices()[:1])) is not None
