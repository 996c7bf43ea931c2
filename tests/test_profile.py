"""`train.profile_at` / `train.profile_steps`: a real jax.profiler trace of a window of steps, its ops mapped to
model scopes through the compiled module's op_name metadata, and the trainer's switch end to end."""
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sphinx_jax import config as cfg
from sphinx_jax.errors import SphinxError
from sphinx_jax.train import profile

from train_helpers import losses, run_train, train_args, write_corpus


@pytest.mark.parametrize("op_name, expected", [
    ("jit(step)/jvp(Sphinx)/Sphinx._inputs/Sphinx.encode_images/towers/convnext/stages_1/while/body/closed_call/"
     "blocks/erfc", ("forward", "towers/convnext/stages_*")),
    ("jit(step)/transpose(jvp(Sphinx))/llm/llm._blocks/layers_3/attention/BKGTH,BKSH->BKGTS/dot_general",
     ("backward", "llm/layers_*/attention")),
    ("jit(step)/jvp(Sphinx)/llm/llm._blocks/layers_0/mlp/jit(silu)/logistic", ("forward", "llm/layers_*/mlp")),
    ("jit(step)/sqrt", ("update", "(step)")),
    ("", ("unattributed", "(no op_name)")),
])
def test_phase_and_scope_read_the_op_name(op_name, expected):
  assert profile.phase_and_scope(op_name) == expected


def test_phase_and_scope_depth_keeps_that_many_modules():
  name = "jit(step)/jvp(Sphinx)/llm/llm._blocks/layers_2/attention/dot_general"
  assert profile.phase_and_scope(name, depth=1) == ("forward", "llm")
  assert profile.phase_and_scope(name, depth=2) == ("forward", "llm/layers_*")


def test_op_names_of_an_op_without_metadata_come_from_what_it_calls_or_reads():
  text = "\n".join([
      "HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[1]{0}}",
      "",
      "%wrapped_computation (param_0: f32[4]) -> f32[1] {",
      "  %param_0 = f32[4]{0} parameter(0)",
      '  ROOT %reduce.2 = f32[1]{0} reduce(%param_0), metadata={op_name="jit(step)/jvp(M)/head/reduce_max"}',
      "}",
      "",
      "ENTRY %main.9 (p: f32[4]) -> f32[1] {",
      "  %p = f32[4]{0} parameter(0)",
      '  %sine.3 = f32[4]{0} sine(%p), metadata={op_name="jit(step)/jvp(M)/body/sin"}',
      "  %wrapped.4 = f32[1]{0} fusion(%sine.3), kind=kLoop, calls=%wrapped_computation",
      "  %copy.5 = f32[4]{0} copy(%sine.3)",
      "  ROOT %copy.6 = f32[4]{0} copy(%p)",
      "}",
  ])
  module, names = profile.hlo_op_names(text)
  assert module == "jit_step"
  assert names["sine.3"] == "jit(step)/jvp(M)/body/sin"
  assert names["wrapped.4"] == "jit(step)/jvp(M)/head/reduce_max"  # from the computation it calls
  assert names["copy.5"] == "jit(step)/jvp(M)/body/sin"  # from its operand
  assert "copy.6" not in names  # reads a parameter: nothing to inherit


def test_an_op_keeps_only_the_time_the_ops_inside_it_leave():
  ops = [(0, 10, "while.1"), (1, 3, "body_op.2"), (5, 4, "body_op.3"), (20, 2, "after.4")]  # ns on one thread
  got = dict(profile._self_times(ops))
  assert got == pytest.approx({"while.1": 3e-9, "body_op.2": 3e-9, "body_op.3": 4e-9, "after.4": 2e-9})


def test_a_trace_without_the_modules_ops_says_so():
  text = profile.summary_text({}, {}, steps=3, title="steps 2-4 of jit_step")
  assert text.startswith("steps 2-4 of jit_step\nno event of this trace names an op of the module")


class Toy(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(2):
      x = nn.Dense(64, name=f"layers_{i}")(jnp.tanh(x))
    return x


def test_a_traced_window_is_summarised_by_scope(tmp_path):
  model = Toy()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((256, 64)), jnp.float32)
  params = model.init(jax.random.key(0), x)

  @jax.jit
  def step(params, x):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(model.apply(p, x) ** 2))(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss

  params, _ = step(params, x)  # compiled outside the window
  window = profile.StepWindow(tmp_path / "tb", start=2, count=3)
  found = None
  for n in range(1, 6):
    window.before(n, params)
    params, _ = step(params, x)
    found = window.after(n, params, lambda: step.lower(params, x).compile().as_text()) or found
  assert found is not None and not window.tracing
  run = found.parent
  assert list(run.glob("*.xplane.pb")) and list(run.glob("*.trace.json.gz"))
  text = found.read_text()
  assert text.startswith("steps 2-4 of jit_step")
  per_step = float(re.search(r"XLA op time per step: ([\d.]+) ms", text).group(1))
  assert per_step > 0
  scopes = {" ".join(line.split()[2:]): float(line.split()[0]) for line in text.split("\n\n")[2].splitlines()[1:]}
  assert {"forward layers_*", "backward layers_*", "update (step)"} <= set(scopes)
  assert sum(scopes.values()) == pytest.approx(per_step, abs=0.01 * len(scopes))


def test_a_window_past_the_run_is_refused():
  c = cfg.base_config(cfg.model_config(cfg.llm_config(), (), 0, 1))
  c.train.update(num_steps=10, profile_at=11)
  with pytest.raises(SphinxError, match="train.profile_at"):
    cfg.validate(c, training=True)
  c.train.update(profile_at=9, profile_steps=3)
  with pytest.raises(SphinxError, match="train.profile_steps"):
    cfg.validate(c, training=True)


@pytest.mark.slow  # two trainer subprocesses: the second CI stage
def test_the_trainer_profiles_a_window_and_trains_the_same(tmp_path):
  corpus, tok = write_corpus(tmp_path / "corpus")
  common = ("--config.train.num_steps=5", "--config.train.log_every=1")
  run_train(train_args(tmp_path / "plain", corpus, tok, *common), devices=1)
  out = run_train(train_args(tmp_path / "traced", corpus, tok, *common, "--config.train.profile_at=2",
                             "--config.train.profile_steps=2"), devices=1)
  summary = json.loads((tmp_path / "traced" / "summary.json").read_text())
  found = Path(summary["profile"])
  assert f"profiled steps: {found}" in out.stdout
  assert found.parent.parent == tmp_path / "traced" / "tensorboard" / "plugins" / "profile"
  text = found.read_text()
  assert text.startswith("steps 2-3 of jit_step")
  for scope in ("forward llm/layers/attention", "backward llm/layers/mlp"):  # configs/llama.py:tiny is scanned
    assert re.search(rf"^ +[\d.]+ +[\d.]+%  {re.escape(scope)}$", text, re.M), scope
  assert losses(tmp_path / "traced") == losses(tmp_path / "plain")  # tracing changes no number
