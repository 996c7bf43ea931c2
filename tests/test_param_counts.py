"""Full-size parameter counts, traced with jax.eval_shape (nothing materialised), against the published models
(SPHINX.md §1: LLaMA-2-13B and TinyLlama-1.1B exactly)."""
import jax
import jax.numpy as jnp
import pytest

import configs.sphinx as presets
from sphinx_jax import sharding as sh
from sphinx_jax.models.llama import Llama


@pytest.mark.parametrize("preset, count", [("sphinx", 13_015_864_320), ("sphinx_tiny", 1_100_048_384)])
def test_decoder_parameter_count(preset, count):
  model = Llama(presets.get_config(preset).model.llm)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, positions=t), tokens)
  assert sh.count_params(abstract["params"]) == count
