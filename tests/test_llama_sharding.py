"""The decoder on 8 host devices, mesh (data=2, fsdp=2, tensor=2) under the default rules: every parameter's
mesh PartitionSpec (golden table written from the rules by hand), and the sharded jitted forward equals the
single-device one."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import configs.sphinx as presets
from sphinx_jax import sharding as sh
from sphinx_jax.models.llama import Llama

# Default rules: embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor; layers -> replicated.
GOLDEN_SCANNED = {
    "embed/embedding": P("tensor", "fsdp"),
    "layers/attention_norm/weight": P(None, "fsdp"),
    "layers/attention/query/kernel": P(None, "fsdp", "tensor"),
    "layers/attention/key/kernel": P(None, "fsdp", "tensor"),
    "layers/attention/value/kernel": P(None, "fsdp", "tensor"),
    "layers/attention/out/kernel": P(None, "tensor", "fsdp"),
    "layers/ffn_norm/weight": P(None, "fsdp"),
    "layers/mlp/gate/kernel": P(None, "fsdp", "tensor"),
    "layers/mlp/up/kernel": P(None, "fsdp", "tensor"),
    "layers/mlp/down/kernel": P(None, "tensor", "fsdp"),
    "final_norm/weight": P("fsdp"),
    "lm_head/kernel": P("fsdp", "tensor"),
}
GOLDEN_LOOP = {  # the same without the leading layers axis, once per layer
    **{k: v for k, v in GOLDEN_SCANNED.items() if not k.startswith("layers/")},
    **{k.replace("layers/", f"layers_{i}/"): P(*v[1:])
       for k, v in GOLDEN_SCANNED.items() if k.startswith("layers/") for i in range(2)},
}
BATCH, LENGTH = 8, 16


def tiny_llm(scan_layers):
  llm = presets.get_config("tiny_sphinx_tiny").model.llm  # GQA: 4 query heads, 2 KV heads
  llm.update(dict(vocab_size=256, scan_layers=scan_layers))
  return llm


def mesh():
  return sh.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2, expert=1)))


def init_args():
  tokens = jnp.zeros((BATCH, LENGTH), jnp.int32)
  return tokens, jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (BATCH, LENGTH))


def boxed_params(model):
  tokens, positions = init_args()
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, positions=positions))["params"]


@pytest.mark.parametrize("scan_layers, golden", [(True, GOLDEN_SCANNED), (False, GOLDEN_LOOP)], ids=["scan", "loop"])
def test_every_parameter_has_its_golden_partition_spec(scan_layers, golden):
  shardings = sh.param_shardings(boxed_params(Llama(tiny_llm(scan_layers))), mesh(), sh.DEFAULT_RULES)
  specs = {path: s.spec for path, s in traverse_util.flatten_dict(
      nn.meta.unbox(shardings), is_leaf=lambda _, x: isinstance(x, NamedSharding), sep="/").items()}
  assert specs == golden


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_sharded_forward_equals_single_device(scan_layers):
  assert jax.device_count() == 8
  model = Llama(tiny_llm(scan_layers))
  tokens, positions = init_args()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, tokens.shape), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(1), tokens, positions=positions))["params"]
  expected, _ = jax.jit(model.apply)({"params": params}, tokens, positions=positions)

  m = mesh()
  param_sh = nn.meta.unbox(sh.param_shardings(boxed_params(model), m, sh.DEFAULT_RULES))
  placed = jax.tree.map(jax.device_put, params, param_sh)
  data_sh = NamedSharding(m, nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH), sh.DEFAULT_RULES))
  logits_sh = NamedSharding(m, nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH, sh.VOCAB), sh.DEFAULT_RULES))
  assert data_sh.spec == P(("data", "fsdp"), None) and logits_sh.spec == P(("data", "fsdp"), None, "tensor")

  def forward(p, t, pos):
    with nn.logical_axis_rules(sh.DEFAULT_RULES):  # activates the activation constraints in the model
      return model.apply({"params": p}, t, positions=pos)[0]

  with jax.set_mesh(m):
    sharded = jax.jit(forward, in_shardings=(param_sh, data_sh, data_sh), out_shardings=logits_sh)
    hlo = sharded.lower(placed, tokens, positions).as_text()
    got = sharded(placed, tokens, positions)
  # The activation constraints reached the program: embedding output and both residuals of the block(s).
  assert hlo.count('sharding_constraint %') >= 3 and '[{"data", "fsdp"}, {}, {}]' in hlo
  assert got.sharding.is_equivalent_to(logits_sh, 3)
  embedding = placed["embed"]["embedding"]
  assert embedding.addressable_shards[0].data.shape == (128, 32)  # vocab over tensor, embed over fsdp
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5)
