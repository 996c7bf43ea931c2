"""SPHINX-MoE's Mixtral decoder: logits against transformers.MixtralForCausalLM (4.57.6, eager) through
convert/hf_mixtral.py, the bit-exact round trip, dense vs grouped dispatch (outputs and gradients), the
load-balancing loss against numpy on HF's own router logits, the forward sharded over (data, expert, tensor), and
the all-to-all expert-parallel dispatch against the dense one on 8 host devices (lossless default capacity, the
configured capacity's drops)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import configs.sphinx as presets
from sphinx_jax import config as cfg
from sphinx_jax import sharding as sh
from sphinx_jax.convert import hf_mixtral
from sphinx_jax.errors import SphinxError
from sphinx_jax.models import moe
from sphinx_jax.models.llama import Llama
from torch_init import randomize_decoder_

VOCAB, LENGTH, EXPERTS, TOP_K = 128, 12, 4, 2


def hf_mixtral_model(seed=0):
  """Tiny MixtralForCausalLM (REFERENCES.md §1b) with every weight random, norms and router included."""
  config = transformers.MixtralConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, max_position_embeddings=256,
      rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = transformers.MixtralForCausalLM._from_config(config, attn_implementation="eager").eval()
  randomize_decoder_(model)
  return model


@pytest.fixture(scope="module")
def reference():
  return hf_mixtral_model()


def state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def tokens(batch=2, length=LENGTH, seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def positions(batch, length):
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def ours_from(model, scan_layers, dispatch):
  llm = hf_mixtral.llm_config_from_hf(model.config.to_dict())
  llm.update(dict(scan_layers=scan_layers, moe=dict(dispatch=dispatch)))
  return Llama(llm), hf_mixtral.params_from_hf(state_dict(model), llm, scan_layers)


@pytest.mark.parametrize("scan_layers, dispatch", [(True, "grouped"), (True, "dense"), (False, "grouped")])
def test_logits_match_hf_mixtral(reference, scan_layers, dispatch):
  ours, params = ours_from(reference, scan_layers, dispatch)
  toks = tokens()
  logits, _ = ours.apply({"params": params}, jnp.asarray(toks), positions=positions(*toks.shape))
  with torch.no_grad():
    expected = reference(torch.from_numpy(toks).long()).logits.numpy()
  assert np.abs(expected).max() > 1.0  # logits far from zero, so 1e-4 is a real bound
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_hf_mixtral_roundtrip_is_bit_exact(reference, scan_layers):
  source = state_dict(reference)
  llm = hf_mixtral.llm_config_from_hf(reference.config.to_dict())
  params = hf_mixtral.params_from_hf(source, llm, scan_layers)
  layer = params["layers"]["moe"] if scan_layers else params["layers_1"]["moe"]
  expert_w2 = source["model.layers.1.block_sparse_moe.experts.3.w2.weight"]  # [D, F], applied as h @ w2.T
  np.testing.assert_array_equal((layer["down"][1] if scan_layers else layer["down"])[3], expert_w2.T)
  back = dict(hf_mixtral.hf_from_params(params, llm))
  assert list(back) == list(source)  # same keys, MixtralForCausalLM state_dict order
  for key, value in source.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_config_roundtrip_through_transformers(reference):
  llm = hf_mixtral.llm_config_from_hf(reference.config.to_dict())
  assert (llm.moe.num_experts, llm.moe.top_k, llm.hidden_dim, llm.rope_theta) == (EXPERTS, TOP_K, 96, 1e6)
  llm.moe.load_balancing_weight = 0.02
  rebuilt = transformers.MixtralConfig(**hf_mixtral.hf_config_from_llm(llm))
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "rope_theta", "num_local_experts", "num_experts_per_tok",
                "tie_word_embeddings", "sliding_window"):
    assert getattr(rebuilt, field) == getattr(reference.config, field), field
  assert hf_mixtral.llm_config_from_hf(rebuilt.to_dict()).to_dict() == llm.to_dict()


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"),
     "model.layers.1.block_sparse_moe.experts.2.w3.weight"),
    (lambda sd: sd.update({"model.layers.0.block_sparse_moe.experts.4.w1.weight": np.ones((96, 64), np.float32)}),
     "model.layers.0.block_sparse_moe.experts.4.w1.weight"),
    (lambda sd: sd.update({"model.layers.0.block_sparse_moe.experts.1.w2.weight": np.ones((64, 95), np.float32)}),
     "model.layers.0.block_sparse_moe.experts.1.w2.weight"),
])
def test_params_from_hf_names_bad_expert_tensors(reference, edit, named):
  source = state_dict(reference)
  edit(source)
  with pytest.raises(SphinxError, match=named.replace(".", r"\.")):
    hf_mixtral.params_from_hf(source, hf_mixtral.llm_config_from_hf(reference.config.to_dict()), True)


def test_bad_dispatch_is_rejected_by_validate():
  config = presets.get_config("tiny_sphinx_moe")
  assert config.model.llm.moe.dispatch == "auto"
  config.model.llm.moe.dispatch = "sparse"
  with pytest.raises(SphinxError, match=r"model\.llm\.moe\.dispatch"):
    cfg.validate(config)


# --- the MoE layer alone ---------------------------------------------------------------------------------

def moe_layer(dispatch):
  return moe.MoeFeedForward(num_experts=EXPERTS, top_k=TOP_K, hidden=24, dispatch=dispatch)


def layer_inputs(seed=0):
  """x float[2, 7, 16] and params; expert 3 is never chosen (its router column is very negative), so the grouped
  path meets an empty group and the gradients of an unused expert."""
  x = jax.random.normal(jax.random.key(seed), (2, 7, 16))
  params = nn.meta.unbox(moe_layer("dense").init(jax.random.key(seed + 1), x))["params"]
  x = x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)  # expert 3's logit is -100 * x[0] <= -100
  params["router"]["kernel"] = params["router"]["kernel"].at[:, 3].set(0.0).at[0, 3].set(-100.0)
  return x, params


@pytest.mark.parametrize("dispatch", ["grouped", "blocked"])
def test_dense_and_grouped_dispatch_agree_in_outputs_and_gradients(dispatch):
  x, params = layer_inputs()
  _, _, experts = moe.route(x.reshape(-1, 16) @ params["router"]["kernel"], TOP_K)
  counts = np.bincount(np.asarray(experts).ravel(), minlength=EXPERTS)
  assert counts[3] == 0 and (counts[:3] > 0).all()  # an empty group, and uneven ones

  def loss(dispatch):
    def f(p, inputs):
      y = moe_layer(dispatch).apply({"params": p}, inputs)
      return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y  # weights every output differently
    return jax.grad(f, argnums=(0, 1), has_aux=True)(params, x)

  (dense_p, dense_x), dense_y = loss("dense")
  (grouped_p, grouped_x), grouped_y = loss(dispatch)
  np.testing.assert_allclose(np.asarray(grouped_y), np.asarray(dense_y), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grouped_x), np.asarray(dense_x), rtol=0, atol=1e-5)
  for path, g in traverse_util.flatten_dict(dense_p, sep="/").items():
    got = traverse_util.flatten_dict(grouped_p, sep="/")[path]
    np.testing.assert_allclose(np.asarray(got), np.asarray(g), rtol=0, atol=1e-5, err_msg=path)
  assert np.abs(np.asarray(dense_p["router"]["kernel"])).max() > 1e-3  # the router learns through the weights
  assert not np.asarray(dense_p["gate"][3]).any()  # an expert nobody chose gets no gradient
  assert (np.abs(np.asarray(dense_p["down"][:3])).sum(axis=(1, 2)) > 0).all()


def test_padded_layout_example():
  rows, counts = moe.padded_layout(jnp.array([1, 0, 1, 1]), 2, 2)
  np.testing.assert_array_equal(np.asarray(rows), [2, 0, 3, 4])
  np.testing.assert_array_equal(np.asarray(counts), [1, 2])


def test_chunk_plan_example():
  chunks, first = moe.chunk_plan(jnp.array([11, 2]), 4)
  assert moe.chunk_sizes(4) == (4, 2, 1)
  np.testing.assert_array_equal(np.asarray(chunks), [[2, 1, 1], [0, 1, 0]])
  np.testing.assert_array_equal(np.asarray(first), [[0, 8, 10], [11, 11, 13]])


@pytest.mark.parametrize("big", [1, 4, 16])
def test_chunk_plan_tiles_every_group_exactly(big):
  """Painting each chunk's granules with its expert's id reproduces the back-to-back groups: every granule of a
  group is covered once, by its own expert, and at most one chunk per size below `big` is used."""
  granules = np.random.default_rng(big).integers(0, 40, 9)
  granules[3] = 0  # an expert with no rows
  chunks, first = (np.asarray(a) for a in moe.chunk_plan(jnp.asarray(granules), big))
  painted = np.full(granules.sum(), -1)
  for e in range(len(granules)):
    for size, n, at in zip(moe.chunk_sizes(big), chunks[e], first[e]):
      for c in range(n):
        assert (painted[at + c * size:at + (c + 1) * size] == -1).all()  # no overlap
        painted[at + c * size:at + (c + 1) * size] = e
  np.testing.assert_array_equal(painted, np.repeat(np.arange(len(granules)), granules))
  assert (chunks[:, 1:] <= 1).all()


@pytest.mark.parametrize("block, granule", [(3, None), (4, 1), (8, 2)])
def test_blocked_dispatch_with_several_chunks_per_expert_equals_dense(block, granule):
  """14 tokens x 2 copies over 4 experts, groups of 11, 10 and 7 copies and an empty one: with block 3 each group runs
  as several 3-row chunks with padding; with (4, 1) and (8, 2) as big chunks plus smaller ones (4 + 2 + 1 rows for
  7 copies; 8 + 4 rows for 11 copies in 2-row granules). The jitted
  outputs and the gradients wrt x, the routing weights and every expert weight match the dense path."""
  x, params = layer_inputs(seed=2)
  flat = x.reshape(-1, 16)
  _, weights, experts = moe.route(flat @ params["router"]["kernel"], TOP_K)
  counts = np.bincount(np.asarray(experts).ravel(), minlength=EXPERTS)
  assert (counts[:3] > 4).all() and (counts % 4 != 0).any()  # several chunks, of more than one size
  args = (flat, weights, params["gate"], params["up"], params["down"])
  probe = jnp.cos(jnp.arange(flat.size).reshape(flat.shape))

  def run(dispatch):
    f = lambda x, w, g, u, d: jnp.sum(dispatch(x, w, g, u, d, experts) * probe)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(*args)

  blocked = lambda x, w, g, u, d, e: moe.blocked_dispatch(x, w, e, g, u, d, block=block, granule=granule)  # noqa: E731
  dense = lambda x, w, g, u, d, e: moe.dense_dispatch(x, w, e, g, u, d)  # noqa: E731
  (dense_y, dense_g), (blocked_y, blocked_g) = run(dense), run(blocked)
  np.testing.assert_allclose(float(blocked_y), float(dense_y), rtol=0, atol=1e-5)
  for name, got, expected in zip(("x", "weights", "gate", "up", "down"), blocked_g, dense_g):
    assert np.abs(np.asarray(expected)).max() > 1e-3, name
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5, err_msg=name)
  np.testing.assert_allclose(np.asarray(jax.jit(blocked)(*args, experts)), np.asarray(dense(*args, experts)),
                             rtol=0, atol=1e-5)


def test_blocked_dispatch_rejects_a_block_that_is_not_a_power_of_two_granules():
  x, params = layer_inputs()
  flat = x.reshape(-1, 16)
  _, weights, experts = moe.route(flat @ params["router"]["kernel"], TOP_K)
  with pytest.raises(SphinxError, match="block 6 must be a power-of-two multiple of granule 2"):
    moe.blocked_dispatch(flat, weights, experts, params["gate"], params["up"], params["down"], block=6, granule=2)


def test_blocked_dispatch_of_one_token_uses_small_blocks_and_equals_dense():
  """Decoding: 1 token x 2 copies get 8-row chunks (not 512), and the result is still the dense one."""
  assert (moe.block_rows(2, 8), moe.block_rows(4096, 8), moe.block_rows(65, 8)) == (8, 512, 16)
  x, params = layer_inputs(seed=5)
  flat = x.reshape(-1, 16)[:1]
  _, weights, experts = moe.route(flat @ params["router"]["kernel"], TOP_K)
  args = (flat, weights, experts, params["gate"], params["up"], params["down"])
  np.testing.assert_allclose(np.asarray(jax.jit(moe.blocked_dispatch)(*args)), np.asarray(moe.dense_dispatch(*args)),
                             rtol=0, atol=1e-5)


def test_block_matmul_does_owned_chunks_with_their_expert_and_leaves_the_rest_zero():
  """Granule 2, big chunks of 2 granules: experts owning [1, 0, 3] granules of a 5-granule buffer; expert 2's group
  (rows 2..7) runs as a 4-row and a 2-row chunk; rows 8..9 are nobody's."""
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((10, 4)).astype(np.float32), rng.standard_normal((3, 4, 5)).astype(np.float32)
  chunks, first = moe.chunk_plan(jnp.array([1, 0, 3]), 2)
  np.testing.assert_array_equal(np.asarray(chunks), [[0, 1], [0, 0], [1, 1]])
  y = np.asarray(jax.jit(moe.block_matmul, static_argnums=(4, 5))(x, w, chunks, first, 2, 2))
  np.testing.assert_allclose(y[:2], x[:2] @ w[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y[2:8], x[2:8] @ w[2], rtol=1e-6, atol=1e-6)
  assert not y[8:].any()
  dy = rng.standard_normal((10, 5)).astype(np.float32)
  dx, dw = jax.vjp(lambda a, b: moe.block_matmul(a, b, chunks, first, 2, 2), x, w)[1](dy)
  np.testing.assert_allclose(np.asarray(dx[:8]), np.concatenate([dy[:2] @ w[0].T, dy[2:8] @ w[2].T]), atol=1e-5)
  assert not np.asarray(dx[8:]).any() and not np.asarray(dw[1]).any()  # unowned rows, an expert with no chunk
  np.testing.assert_allclose(np.asarray(dw[0]), x[:2].T @ dy[:2], atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw[2]), x[2:8].T @ dy[2:8], atol=1e-5)


def test_blocked_dispatch_never_materialises_per_block_weights():
  """The program (forward and backward) holds no [blocks, ...] stack of expert weights: each expert's weights are
  sliced once (the earlier version gathered [blocks, D, F] per projection, ~1.8 GB per forward at mid size)."""
  x, params = layer_inputs(seed=2)
  flat = x.reshape(-1, 16)
  _, weights, experts = moe.route(flat @ params["router"]["kernel"], TOP_K)
  f = lambda g, u, d: jnp.sum(moe.blocked_dispatch(flat, weights, experts, g, u, d, block=3))  # noqa: E731
  hlo = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(params["gate"], params["up"], params["down"]).compile().as_text()
  blocks = -(-14 * 2 // 3) + EXPERTS
  assert "while" in hlo
  for shape in (f"f32[{blocks},16,24]", f"f32[{blocks},24,16]"):
    assert shape not in hlo, shape


def test_grouped_dispatch_matches_a_per_token_loop():
  """The grouped path against the plain definition: for each token, sum over its top-K of weight * expert(x)."""
  x, params = layer_inputs(seed=3)
  y = np.asarray(moe_layer("grouped").apply({"params": params}, x)).reshape(-1, 16)
  flat = np.asarray(x, np.float64).reshape(-1, 16)
  logits = flat @ np.asarray(params["router"]["kernel"], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  gate, up, down = (np.asarray(params[k], np.float64) for k in ("gate", "up", "down"))
  for n in range(flat.shape[0]):
    top = np.argsort(-probs[n])[:TOP_K]
    w = probs[n, top] / probs[n, top].sum()
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    expected = sum(wk * (silu(flat[n] @ gate[e]) * (flat[n] @ up[e])) @ down[e] for wk, e in zip(w, top))
    np.testing.assert_allclose(y[n], expected, rtol=0, atol=1e-5)


def test_grouped_dispatch_in_bf16_compiles_for_tpu_at_highest_precision():
  """XLA:TPU lowers ragged_dot to a Mosaic kernel that rejects bf16 operands at 'highest' (the precision conftest
  sets, and the one the full-size SPHINX-MoE compile test failed on): the grouped path, also the inside of
  expert_parallel, still compiles for a TPU slice, ahead of time on this host."""
  pytest.importorskip("libtpu")
  from sphinx_jax import topology as topo
  assert jax.config.jax_default_matmul_precision == "highest"
  mesh = topo.topology_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1)),
                            topo.describe("v5p-8"))
  replicated = NamedSharding(mesh, P())
  spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)  # noqa: E731
  args = (spec((64, 16)), spec((64, TOP_K)), spec((64, TOP_K), jnp.int32), spec((EXPERTS, 16, 24)),
          spec((EXPERTS, 16, 24)), spec((EXPERTS, 24, 16)))
  assert "ragged" in jax.jit(moe.grouped_dispatch).lower(*args).as_text()
  jax.jit(moe.grouped_dispatch).lower(*args).compile()


def numpy_balancing_loss(router_logits):
  """The formula of SPHINX.md §2.2 in numpy: E/(N*K) * sum_e count_e * mean_n softmax(logits)[n, e]."""
  logits = np.asarray(router_logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  chosen = np.argsort(-probs, axis=-1)[:, :TOP_K]
  counts = np.bincount(chosen.ravel(), minlength=EXPERTS)
  return EXPERTS / (probs.shape[0] * TOP_K) * np.dot(counts, probs.mean(0))


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_load_balancing_loss_matches_numpy_on_hf_router_logits(reference, scan_layers):
  ours, params = ours_from(reference, scan_layers, "grouped")
  toks = tokens(seed=5)
  _, state = ours.apply({"params": params}, jnp.asarray(toks), positions=positions(*toks.shape),
                        mutable=[moe.AUX_COLLECTION])
  with torch.no_grad():
    router_logits = reference(torch.from_numpy(toks).long(), output_router_logits=True).router_logits
  per_layer = [numpy_balancing_loss(r.numpy()) for r in router_logits]
  assert len(per_layer) == 2 and abs(per_layer[0] - per_layer[1]) > 1e-4  # layers differ: the mean is checked
  np.testing.assert_allclose(float(moe.load_balancing_loss(state[moe.AUX_COLLECTION])), np.mean(per_layer),
                             rtol=1e-5)


def test_load_balancing_loss_needs_the_collection():
  with pytest.raises(SphinxError, match="mutable"):
    moe.load_balancing_loss({})


# --- sharding ---------------------------------------------------------------------------------------------

GOLDEN_MOE = {  # default rules: expert -> expert, embed -> fsdp, mlp -> tensor; layers replicated
    "layers/moe/router/kernel": P(None, "fsdp", None),
    "layers/moe/gate": P(None, "expert", "fsdp", "tensor"),
    "layers/moe/up": P(None, "expert", "fsdp", "tensor"),
    "layers/moe/down": P(None, "expert", "tensor", "fsdp"),
}


@pytest.mark.parametrize("dispatch", ["grouped", "dense", "expert_parallel"])
def test_sharded_forward_over_data_expert_tensor_equals_single_device(dispatch):
  assert jax.device_count() == 8

  def llm(kind):
    c = presets.get_config("tiny_sphinx_moe").model.llm
    c.update(dict(vocab_size=VOCAB, moe=dict(dispatch=kind)))
    return c

  model, dense = Llama(llm(dispatch)), Llama(llm("dense"))  # dense: the single-device reference and init
  toks = jnp.asarray(tokens(batch=4, length=8, seed=7))
  pos = positions(4, 8)
  boxed = jax.eval_shape(lambda: dense.init(jax.random.key(0), toks, positions=pos))["params"]
  params = nn.meta.unbox(dense.init(jax.random.key(2), toks, positions=pos))["params"]
  expected, _ = jax.jit(dense.apply)({"params": params}, toks, positions=pos)

  m = sh.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=1, tensor=2, expert=2)))
  param_sh = nn.meta.unbox(sh.param_shardings(boxed, m, sh.DEFAULT_RULES))
  specs = {p: s.spec for p, s in traverse_util.flatten_dict(
      param_sh, is_leaf=lambda _, x: isinstance(x, NamedSharding), sep="/").items() if "/moe/" in p}
  assert specs == GOLDEN_MOE
  placed = jax.tree.map(jax.device_put, params, param_sh)
  assert placed["layers"]["moe"]["gate"].addressable_shards[0].data.shape == (2, 2, 64, 48)  # E and F split
  data_sh = NamedSharding(m, nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH), sh.DEFAULT_RULES))

  def forward(p, t, q):
    with nn.logical_axis_rules(sh.DEFAULT_RULES):
      return model.apply({"params": p}, t, positions=q)[0]

  with jax.set_mesh(m):
    got = jax.jit(forward, in_shardings=(param_sh, data_sh, data_sh))(placed, toks, pos)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5)


# --- expert-parallel dispatch (all-to-all over the 'expert' axis) -------------------------------------------

EP_MESHES = [dict(data=2, fsdp=1, tensor=2, expert=2), dict(data=1, fsdp=2, tensor=1, expert=4)]


def ep_inputs(seed=0):
  """x float[4, 8, 16] (32 tokens: 4 or 8 per device) and the layer's params."""
  x = jax.random.normal(jax.random.key(seed), (4, 8, 16))
  return x, nn.meta.unbox(moe_layer("dense").init(jax.random.key(seed + 1), x))["params"]


def layer_grads(dispatch, params, x, capacity_factor=0.0):
  """Jitted (params grads, x grads), output of a loss that weights every output differently."""
  layer = moe.MoeFeedForward(num_experts=EXPERTS, top_k=TOP_K, hidden=24, dispatch=dispatch,
                             capacity_factor=capacity_factor)

  def f(p, inputs):
    y = layer.apply({"params": p}, inputs)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y
  return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(params, x)


def assert_trees_close(got, expected):
  flat = traverse_util.flatten_dict(expected, sep="/")
  for path, value in traverse_util.flatten_dict(got, sep="/").items():
    np.testing.assert_allclose(np.asarray(value), np.asarray(flat[path]), rtol=0, atol=1e-5, err_msg=path)


def mesh_of(sizes):
  return sh.make_mesh(ml_collections.ConfigDict(sizes))


@pytest.mark.parametrize("sizes", EP_MESHES, ids=["data2-expert2-tensor2", "fsdp2-expert4"])
def test_expert_parallel_equals_dense_in_outputs_and_gradients(sizes):
  x, params = ep_inputs()
  (dense_p, dense_x), dense_y = layer_grads("dense", params, x)
  with jax.set_mesh(mesh_of(sizes)):
    (ep_p, ep_x), ep_y = layer_grads("expert_parallel", params, x)
    hlo = jax.jit(moe_layer("expert_parallel").apply).lower({"params": params}, x).compile().as_text()
  assert "all-to-all" in hlo  # tokens really travel to the experts' devices
  np.testing.assert_allclose(np.asarray(ep_y), np.asarray(dense_y), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ep_x), np.asarray(dense_x), rtol=0, atol=1e-5)
  assert_trees_close(ep_p, dense_p)
  assert (np.abs(np.asarray(dense_p["gate"])).sum(axis=(1, 2)) > 0).all()  # every expert (device) got tokens


def routed_to_experts_0_and_1(params, x):
  """Router weights sending every token to experts 0 and 1, both held by expert-device 0 of an expert=2 mesh."""
  kernel = params["router"]["kernel"].at[:, :2].set(0.0).at[:, 2:].set(0.0)
  x = x.at[..., 0].set(jnp.abs(x[..., 0]) + 1.0)
  kernel = kernel.at[0, 0].set(20.0).at[0, 1].set(19.0)  # logits 20*x0 > 19*x0 > 0 for the other two experts
  return {**params, "router": {"kernel": kernel}}, x


def test_default_capacity_is_lossless_when_every_copy_goes_to_one_device():
  x, params = ep_inputs(seed=4)
  params, x = routed_to_experts_0_and_1(params, x)
  _, _, experts = moe.route(x.reshape(-1, 16) @ params["router"]["kernel"], TOP_K)
  assert set(np.asarray(experts).ravel()) == {0, 1}  # the worst case: all 64 copies to one of 2 devices
  (dense_p, dense_x), dense_y = layer_grads("dense", params, x)
  with jax.set_mesh(mesh_of(EP_MESHES[0])):
    (ep_p, ep_x), ep_y = layer_grads("expert_parallel", params, x)
  np.testing.assert_allclose(np.asarray(ep_y), np.asarray(dense_y), rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ep_x), np.asarray(dense_x), rtol=0, atol=1e-5)
  assert_trees_close(ep_p, dense_p)


def test_configured_capacity_drops_the_copies_past_it():
  """capacity_factor 1 on expert=2: C = ceil(16 copies / 2) = 8 rows per (source, destination). Each of the 4
  token shards (data x expert) holds 8 tokens = 16 copies, all bound for device 0; the first 8 copies in
  (token, k) order fit, i.e. the first 4 tokens of each shard keep both experts and the last 4 lose both."""
  x, params = ep_inputs(seed=4)
  params, x = routed_to_experts_0_and_1(params, x)
  _, dense_y = layer_grads("dense", params, x)
  with jax.set_mesh(mesh_of(EP_MESHES[0])):
    _, ep_y = layer_grads("expert_parallel", params, x, capacity_factor=1.0)
  kept = (np.arange(32) % 8 < 4).reshape(4, 8, 1)
  assert np.abs(np.asarray(dense_y)[~kept.repeat(16, -1)]).min() > 0  # the dropped outputs were non-zero
  np.testing.assert_allclose(np.asarray(ep_y), np.where(kept, np.asarray(dense_y), 0.0), rtol=0, atol=1e-5)


def test_group_rank_and_capacity():
  np.testing.assert_array_equal(np.asarray(moe.group_rank(jnp.array([1, 0, 1, 1]), 2)), [0, 0, 1, 2])
  assert moe.capacity(16, 2, 0.0) == 16  # lossless: every copy may go to one device
  assert moe.capacity(16, 4, 1.25) == 5 and moe.capacity(16, 2, 3.0) == 16


def test_expert_parallel_needs_a_mesh_and_divisible_experts():
  x, params = ep_inputs()
  with pytest.raises(SphinxError, match="needs a device mesh"):
    moe_layer("expert_parallel").apply({"params": params}, x)
  with jax.set_mesh(mesh_of(dict(data=1, fsdp=1, tensor=1, expert=8))):
    with pytest.raises(SphinxError, match="4 experts do not divide over mesh expert=8"):
      moe_layer("expert_parallel").apply({"params": params}, x)


def test_expert_parallel_pads_a_token_count_that_does_not_split():
  x, params = ep_inputs(seed=6)
  x = x[:3, :5]  # 15 tokens over data x expert = 4 shards (init and generation see such odd counts)
  expected = moe_layer("dense").apply({"params": params}, x)
  with jax.set_mesh(mesh_of(EP_MESHES[0])):
    got = jax.jit(moe_layer("expert_parallel").apply)({"params": params}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5)


def test_auto_dispatch_follows_the_mesh_and_the_platform():
  assert moe.pick_dispatch() == "blocked"  # no mesh, CPU backend
  with jax.set_mesh(mesh_of(dict(data=8, fsdp=1, tensor=1, expert=1))):
    assert moe.pick_dispatch() == "blocked"
  with jax.set_mesh(mesh_of(EP_MESHES[0])):
    assert moe.pick_dispatch() == "expert_parallel"
    x, params = ep_inputs()
    hlo = jax.jit(moe_layer("auto").apply).lower({"params": params}, x).compile().as_text()
  assert "all-to-all" in hlo  # the layer really takes the resolved path
  pytest.importorskip("libtpu")
  from sphinx_jax import topology as topo
  sizes = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  tpu = topo.topology_mesh(sizes, topo.describe("v5p-8"))
  with jax.set_mesh(tpu):  # an AOT build for a TPU slice on this CPU host
    assert moe.pick_dispatch() == "grouped"


def test_capacity_factor_is_validated():
  config = presets.get_config("tiny_sphinx_moe")
  config.model.llm.moe.dispatch = "expert_parallel"
  cfg.validate(config)
  config.model.llm.moe.capacity_factor = -1.0
  with pytest.raises(SphinxError, match=r"model\.llm\.moe\.capacity_factor"):
    cfg.validate(config)
