"""The decoder against transformers.LlamaForCausalLM (4.57.6, eager attention) through convert/hf.py: logits,
greedy continuation, key/bit round trip, KV-cache decoding, remat policies, backends and bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn
from flax import traverse_util

from sphinx_jax import config as cfg
from sphinx_jax.convert import hf
from sphinx_jax.errors import SphinxError
from sphinx_jax.inference.generate import Generator, run, stop_table
from sphinx_jax.models import layers
from sphinx_jax.models.llama import (Llama, _cudnn_attention, attention_backend, init_cache, stack_layers,
                                     unstack_layers)
from sphinx_jax.models.sphinx import Sphinx
from torch_init import randomize_decoder_

VOCAB, PROMPT = 128, 12


def hf_llama(kv_heads, seed=0, **overrides):
  """Tiny LlamaForCausalLM with every weight random, norm weights included (ones would hide a missing norm)."""
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=kv_heads, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=1e4,
      tie_word_embeddings=False, **overrides)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()
  randomize_decoder_(model)
  model.generation_config.eos_token_id = None  # greedy runs its full length (the Generator knows no EOS here)
  return model


def state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def ours_from(model, scan_layers, **llm_overrides):
  llm = hf.llm_config_from_hf(model.config.to_dict())
  llm.update(dict(scan_layers=scan_layers, **llm_overrides))
  return Llama(llm), hf.params_from_hf(state_dict(model), llm, scan_layers)


def tokens(batch, length, seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


def arange_positions(batch, length, start=0):
  return jnp.broadcast_to(jnp.arange(start, start + length, dtype=jnp.int32), (batch, length))


def hf_logits(model, toks):
  with torch.no_grad():
    return model(torch.from_numpy(toks).long()).logits.numpy()


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_logits_match_hf(kv_heads, scan_layers):
  model = hf_llama(kv_heads)
  ours, params = ours_from(model, scan_layers)
  toks = tokens(2, PROMPT)
  logits, _ = ours.apply({"params": params}, jnp.asarray(toks), positions=arange_positions(2, PROMPT))
  expected = hf_logits(model, toks)
  assert np.abs(expected).max() > 1.0  # random weights give logits far from zero, so 1e-4 is a real bound
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-4)


def test_linear_rope_scaling_matches_hf():
  """HF linear factor f == accessory rope_scaling 1/f (positions multiplied); a wrong direction fails here."""
  model = hf_llama(2, rope_scaling={"rope_type": "linear", "factor": 4.0})
  ours, params = ours_from(model, True)
  assert ours.config.rope_scaling == 0.25
  toks = tokens(1, PROMPT)
  logits, _ = ours.apply({"params": params}, jnp.asarray(toks), positions=arange_positions(1, PROMPT))
  np.testing.assert_allclose(np.asarray(logits), hf_logits(model, toks), rtol=0, atol=1e-4)


def generator_of(model, params, unscan_layers=False):
  """The decode loop of inference/generate.py on the decoder alone: a text-only SPHINX (towers=()), no tokenizer."""
  sphinx = Sphinx(cfg.model_config(model.config, (), 0, 1, dtype="float32"))
  return Generator(sphinx, {"llm": params}, unscan_layers=unscan_layers)


def hf_greedy(model, prompts, new):
  """HF greedy continuations of id lists in one left-padded batch (attention mask 0 on the padding)."""
  length = max(map(len, prompts))
  ids = torch.zeros(len(prompts), length, dtype=torch.long)
  mask = torch.zeros(len(prompts), length, dtype=torch.long)
  for i, prompt in enumerate(prompts):
    ids[i, length - len(prompt):] = torch.tensor(prompt)
    mask[i, length - len(prompt):] = 1
  with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
  return out[:, length:].tolist()


@pytest.mark.parametrize("unscan_layers", [False, True], ids=["scan", "loop"])
def test_greedy_continuation_matches_hf(unscan_layers):
  """16 greedy tokens for a batch of a 12- and a 7-token prompt: the short row is padded, its positions start at 0."""
  model = hf_llama(2)
  ours, params = ours_from(model, True)
  toks = tokens(2, PROMPT, seed=3)
  prompts = [toks[0].tolist(), toks[1, 5:].tolist()]
  expected = hf_greedy(model, prompts, 16)
  assert all(len(set(row)) > 2 for row in expected)  # real continuations, not one repeated token
  if not unscan_layers:
    assert generator_of(ours, params).generate_ids(prompts, max_new_tokens=16) == expected
    return
  # Built with another model's params, then given the right (scanned) ones as training evaluation does: the
  # setter must unstack them into the unscanned layout the decode loop runs.
  generator = generator_of(ours, ours_from(hf_llama(2, seed=1), True)[1], unscan_layers=True)
  generator.params = {"llm": params}
  assert not generator.model.config.llm.scan_layers and "layers_1" in generator.params["llm"]
  assert generator.generate_ids(prompts, max_new_tokens=16) == expected


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU-only compiler setting")
def test_generator_compiles_without_ynn_fusions_on_cpu():
  """generate.CPU_COMPILER_OPTIONS reach the generation program: with XLA CPU's defaults a 2-row decode hands its
  products to YNNPACK fusions (the premise: if that changes, the setting is moot), the Generator's has none."""
  ours, params = ours_from(hf_llama(2), False)
  generator = generator_of(ours, params)
  args = (generator.params, jnp.zeros((2, 8), jnp.int32), jnp.full((2,), 8, jnp.int32), None, None,
          jax.random.key(0), jnp.float32(0), jnp.float32(1), jnp.int32(4), stop_table([]), 16)
  default = jax.jit(lambda *a: run(generator.model, *a), static_argnums=(10,)).lower(*args).compile()
  assert "__ynn_fusion" in default.as_text()
  assert "__ynn_fusion" not in generator._run.lower(*args).compile().as_text()


def test_generator_without_tokenizer_takes_ids_only():
  ours, params = ours_from(hf_llama(2), True)
  generator = generator_of(ours, params)
  with pytest.raises(SphinxError, match="a text prompt needs a tokenizer"):
    generator.generate_ids(["hello"], max_new_tokens=4)
  with pytest.raises(SphinxError, match="a stop string needs a tokenizer"):
    generator.generate_ids([[1, 2, 3]], max_new_tokens=4, stops=["###"])
  with pytest.raises(SphinxError, match="text output needs a tokenizer"):
    generator.generate([[1, 2, 3]], max_new_tokens=4, stops=[])


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_hf_roundtrip_is_bit_exact(scan_layers):
  model = hf_llama(2)
  source = state_dict(model)
  llm = hf.llm_config_from_hf(model.config.to_dict())
  back = dict(hf.hf_from_params(hf.params_from_hf(source, llm, scan_layers), llm))
  assert list(back) == list(source)  # same keys, HF state_dict order
  for key, value in source.items():
    assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_query_key_rows_become_interleaved_pairs():
  """Row permutation by hand: head 0 of a rotate-half q_proj with H=4 has rows (a0 a1 | b0 b1) -> a0 b0 a1 b1."""
  llm = hf.llm_config_from_hf(hf_llama(2).config.to_dict())
  llm.n_heads = 2
  w = np.arange(8)[:, None] * np.ones((1, 3))  # 2 heads x H=4 rows, D=3
  ours = hf.QUERY[0](w, llm)
  np.testing.assert_array_equal(ours[0], [0, 2, 1, 3, 4, 6, 5, 7])
  np.testing.assert_array_equal(hf.QUERY[1](ours, llm), w)


class CountingSource(dict):
  """A lazy-looking source that records every tensor read."""

  def __init__(self, *args):
    super().__init__(*args)
    self.reads = []

  def __getitem__(self, key):
    self.reads.append(key)
    return super().__getitem__(key)


def test_params_from_hf_reads_each_tensor_once():
  model = hf_llama(2)
  source = CountingSource(state_dict(model))
  hf.params_from_hf(source, hf.llm_config_from_hf(model.config.to_dict()), True)
  assert sorted(source.reads) == sorted(source)


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
    (lambda sd: sd.update({"model.norm.weight": np.ones(65, np.float32)}), "model.norm.weight"),
    (lambda sd: sd.update({"model.layers.2.mlp.up_proj.weight": np.ones(1, np.float32)}),
     "model.layers.2.mlp.up_proj.weight"),
    (lambda sd: sd.update({"model.rotary_emb.inv_freq": np.ones(8, np.float32)}), "model.rotary_emb.inv_freq"),
])
def test_params_from_hf_names_bad_tensors(edit, named):
  model = hf_llama(2)
  source = state_dict(model)
  edit(source)
  with pytest.raises(SphinxError, match=named.replace(".", r"\.")):
    hf.params_from_hf(source, hf.llm_config_from_hf(model.config.to_dict()), True)


def test_config_roundtrip_through_transformers():
  model = hf_llama(2, rope_scaling={"rope_type": "linear", "factor": 2.0})
  llm = hf.llm_config_from_hf(model.config.to_dict())
  rebuilt = transformers.LlamaConfig(**hf.hf_config_from_llm(llm))
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
                "tie_word_embeddings", "head_dim"):
    assert getattr(rebuilt, field) == getattr(model.config, field), field
  assert hf.llm_config_from_hf(rebuilt.to_dict()).to_dict() == llm.to_dict()


@pytest.mark.parametrize("field, value", [("tie_word_embeddings", True), ("attention_bias", True),
                                          ("mlp_bias", True), ("hidden_act", "gelu"),
                                          ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
                                          ("head_dim", 32), ("model_type", "mistral")])
def test_llm_config_from_hf_rejects_what_the_original_cannot_express(field, value):
  config = hf_llama(2).config.to_dict()
  config[field] = value
  with pytest.raises(SphinxError, match=field):
    hf.llm_config_from_hf(config)


@pytest.mark.parametrize("scan_layers, per_layer", [(True, False), (False, False), (False, True)],
                         ids=["scan", "loop", "loop-per-layer-cache"])
def test_kv_cache_decoding_equals_full_forward(scan_layers, per_layer):
  model = hf_llama(2)
  ours, params = ours_from(model, scan_layers)
  apply = jax.jit(ours.apply)
  batch, prefill, steps = 3, 7, 8
  toks = jnp.asarray(tokens(batch, prefill + steps, seed=5))
  full, _ = apply({"params": params}, toks, positions=arange_positions(batch, prefill + steps))
  cache = init_cache(ours.config, batch, prefill + steps + 3, per_layer=per_layer)  # spare slots stay masked
  step_logits, cache = apply({"params": params}, toks[:, :prefill], positions=arange_positions(batch, prefill),
                             cache=cache)
  pieces = [step_logits]
  for t in range(prefill, prefill + steps):
    step_logits, cache = apply({"params": params}, toks[:, t:t + 1], positions=arange_positions(batch, 1, t),
                               cache=cache)
    pieces.append(step_logits)
  assert int(cache["index"]) == prefill + steps
  assert isinstance(cache["k"], list) == per_layer and len(cache["k"]) == 2
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), np.asarray(full), rtol=0, atol=1e-5)


def test_per_layer_cache_needs_unscanned_layers():
  ours, params = ours_from(hf_llama(2), True)
  with pytest.raises(SphinxError, match="per_layer=True\\) needs scan_layers=False"):
    ours.apply({"params": params}, jnp.asarray(tokens(1, 4)), positions=arange_positions(1, 4),
               cache=init_cache(ours.config, 1, 8, per_layer=True))


def test_embeddings_input_equals_tokens_input():
  model = hf_llama(2)
  ours, params = ours_from(model, True)
  toks = jnp.asarray(tokens(2, PROMPT))
  pos = arange_positions(2, PROMPT)
  embedded = ours.apply({"params": params}, toks, method=lambda m, t: m.embed(t))
  np.testing.assert_array_equal(np.asarray(embedded), params["embed"]["embedding"][np.asarray(toks)])
  by_tokens, _ = ours.apply({"params": params}, toks, positions=pos)
  by_embeddings, _ = ours.apply({"params": params}, embeddings=embedded, positions=pos)
  np.testing.assert_array_equal(np.asarray(by_tokens), np.asarray(by_embeddings))


def test_packed_segments_do_not_see_each_other():
  """Two sequences packed in one row give the logits each gets alone (positions restart per segment)."""
  model = hf_llama(2)
  ours, params = ours_from(model, True)
  a, b = tokens(1, 5, seed=6), tokens(1, 7, seed=7)
  packed = jnp.asarray(np.concatenate([a, b], axis=1))
  positions = jnp.asarray(np.concatenate([np.arange(5), np.arange(7)])[None], jnp.int32)
  segments = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
  logits, _ = ours.apply({"params": params}, packed, positions=positions, segment_ids=segments)
  np.testing.assert_allclose(np.asarray(logits[:, :5]), hf_logits(model, a), rtol=0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(logits[:, 5:]), hf_logits(model, b), rtol=0, atol=1e-4)


def test_the_mask_is_causal_by_index_so_query_blocks_change_nothing():
  """Tokens sharing a position (here all at 0) see no later token, as under the original's triangular mask; so
  the attention's causal query blocks (llm.causal_blocks) give the whole attention's logits."""
  model = hf_llama(2)
  toks = jnp.asarray(tokens(2, 12, seed=9))
  same_position = jnp.zeros((2, 12), jnp.int32)
  logits = {}
  for blocks in (1, 4):
    ours, params = ours_from(model, True, causal_blocks=blocks)
    logits[blocks] = np.asarray(ours.apply({"params": params}, toks, positions=same_position)[0])
  np.testing.assert_allclose(logits[4], logits[1], rtol=0, atol=1e-5)
  first_alone, _ = ours.apply({"params": params}, toks[:, :1], positions=same_position[:, :1])
  np.testing.assert_allclose(logits[4][:, :1], np.asarray(first_alone), rtol=0, atol=1e-5)


def test_rope_angles_are_computed_once_per_step():
  """The compiled loss-and-gradient of a 2-layer unscanned decoder holds one cosine and one sine, each over the RoPE
  table (`layers.rope_tables`); with the angles computed from the positions, XLA CPU fused them into each layer's
  rotation and each gradient (8 of each). Unscanned only: a scanned decoder computed them once before as well."""
  model = hf_llama(2)
  ours, params = ours_from(model, False)
  toks = jnp.asarray(tokens(2, PROMPT, seed=8))
  loss = lambda p: ours.apply({"params": p}, toks, positions=arange_positions(2, PROMPT))[0].sum()
  hlo = jax.jit(jax.grad(loss)).lower(jax.tree.map(jnp.asarray, params)).compile().as_text()
  assert hlo.count(" cosine(") == 1 and hlo.count(" sine(") == 1


def test_rope_rows_past_the_table_are_nan_and_decoding_matches_them():
  """Past 2 x max_seq_len (the original's table, where its indexing fails) the rotation is NaN, not a clamped row;
  a decoding step's single position (its angles taken directly) gives the table's rows bit for bit."""
  positions = jnp.array([[0, 7, 8]])
  cos, sin = layers.rope_tables(positions, 4, 10000.0, 2.0, length=8)
  assert cos.shape == sin.shape == (1, 3, 1, 2)
  np.testing.assert_array_equal(cos[0, 0, 0], [1, 1])
  assert np.isfinite(cos[0, 1]).all() and np.isnan(cos[0, 2]).all() and np.isnan(sin[0, 2]).all()
  for i in range(3):
    one = layers.rope_tables(positions[:, i:i + 1], 4, 10000.0, 2.0, length=8)
    np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(cos[:, i:i + 1]))
    np.testing.assert_array_equal(np.asarray(one[1]), np.asarray(sin[:, i:i + 1]))


def loss_and_grads(policy, scan_layers):
  model = hf_llama(2)
  ours, params = ours_from(model, scan_layers, remat_policy=policy)
  toks = jnp.asarray(tokens(2, PROMPT, seed=8))

  def loss(p):
    logits, _ = ours.apply({"params": p}, toks[:, :-1], positions=arange_positions(2, PROMPT - 1))
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1).mean()

  return jax.jit(jax.value_and_grad(loss))(jax.tree.map(jnp.asarray, params))


@pytest.mark.parametrize("scan_layers, policies", [
    (True, [p for p in layers.REMAT_POLICIES if p != "none"]),
    (False, ["save_qkv_mlp"]),  # the unscanned path wraps each block the same way; one policy shows it works
], ids=["scan", "loop"])
def test_remat_policies_keep_loss_and_grads(scan_layers, policies):
  ref_loss, ref_grads = loss_and_grads("none", scan_layers)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref_grads))
  for policy in policies:
    loss, grads = loss_and_grads(policy, scan_layers)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6, err_msg=policy)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=policy),
                 grads, ref_grads)


def test_remat_policy_changes_what_is_saved(capsys):
  """Fewer residuals under 'full' than 'save_qkv_mlp' than 'none': the policy really reaches the blocks."""
  model = hf_llama(2)
  toks = jnp.asarray(tokens(1, PROMPT))

  def saved(policy):
    ours, params = ours_from(model, True, remat_policy=policy)
    f = lambda p: ours.apply({"params": p}, toks, positions=arange_positions(1, PROMPT))[0].sum()
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(f, jax.tree.map(jnp.asarray, params))
    return len(capsys.readouterr().out.splitlines())

  assert saved("full") < saved("save_qkv_mlp") < saved("none")


@pytest.mark.parametrize("queries", [5, 1], ids=["prefill", "step"])
def test_jax_sdpa_core_and_cache_layout_kv_match_the_xla_reference(queries):
  """The cuDNN backend's call (jax.nn.dot_product_attention, here on its XLA path) agrees with our reference, and
  so does each backend given k, v in the KV cache's layout (k [B, K, H, S], v [B, K, S, H]); one query takes the
  decode step's multiply-and-sum path."""
  rng = np.random.default_rng(9)
  q = jnp.asarray(rng.normal(size=(2, queries, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 7, 2, 8)), jnp.float32) for _ in range(2))
  mask = layers.attention_mask(arange_positions(2, queries, 6 - queries), arange_positions(2, 7), causal=True)
  expected = np.asarray(layers.dot_product_attention(q, k, v, mask))
  k_cached, v_cached = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
  for got in (_cudnn_attention(q, k, v, mask, implementation="xla"),
              _cudnn_attention(q, k_cached, v_cached, mask, implementation="xla", cache_layout=True),
              layers.dot_product_attention(q, k_cached, v_cached, mask, cache_layout=True)):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-6)


def whole_cache_producers(hlo_block: str, elements: int) -> list[str]:
  """Names of the instructions in `hlo_block` (one HLO computation) that yield an f32 array of one layer's cache
  size, in any shape (a reshaped copy counts), other than parameters, tuples and free bitcasts."""
  names = []
  for line in hlo_block.splitlines():
    if "=" not in line or not line.split("=", 1)[1].strip().startswith("f32["):
      continue
    dims = line.split("=", 1)[1].strip()[4:].split("]")[0]
    if dims and np.prod([int(d) for d in dims.split(",")]) == elements and not any(
        op in line for op in ("parameter(", "get-tuple-element(", "tuple(", " bitcast(")):
      names.append(line.split("=")[0].strip())
  return names


def test_decode_step_moves_only_the_new_cache_entries():
  """A compiled single-token step writes each layer's K and V slot in place and reads the cache as it lies: no
  other instruction yields a whole layer's cache (with such a layout copy per layer, the attention core of
  bench/decoder.py's config M at batch 8 took 4.7 ms instead of 0.8 ms)."""
  ours, params = ours_from(hf_llama(2), False)
  batch, slots = 3, 40
  cache = init_cache(ours.config, batch, slots, per_layer=True)
  assert cache["k"][0].shape == (batch, 2, 16, slots) and cache["v"][0].shape == (batch, 2, slots, 16)
  step = jax.jit(lambda p, t, pos, c: ours.apply({"params": p}, t, positions=pos, cache=c), donate_argnums=3)
  hlo = step.lower(params, jnp.zeros((batch, 1), jnp.int32), arange_positions(batch, 1, 9), cache).compile()
  entry = hlo.as_text().split("\nENTRY ")[1]
  writers = whole_cache_producers(entry, batch * 2 * slots * 16)
  assert len(writers) == 2 * ours.config.n_layers, writers  # one K and one V write per layer
  assert all("dynamic-update-slice" in w for w in writers), writers


def test_generation_loop_copies_no_cache():
  """Inside the compiled generation loop (a while loop), each step writes each layer's K and V slot in place and
  nothing else yields a whole layer's cache. Attention as dots made XLA CPU copy the K cache into another layout
  or duplicate the V write into a copy of the buffer, per layer and step (~32 MB per step at config M)."""
  ours, params = ours_from(hf_llama(2), True)
  generator = generator_of(ours, params, unscan_layers=True)
  prompts, new = [[1, 5, 9, 4]], 16
  tokens, lengths = generator._prepare(prompts, False, new)
  hlo = generator._run.lower(generator.params, tokens, lengths, None, None, jax.random.key(0), jnp.float32(0),
                             jnp.float32(1), jnp.int32(new), stop_table([]), new).compile().as_text()
  slots = tokens.shape[1] + new
  loop = [line for line in hlo.splitlines() if " while(" in line and f"f32[1,2,16,{slots}]" in line]
  assert len(loop) == 1, loop
  body = loop[0].split("body=")[1].split(",")[0].strip()
  block = hlo.split(f"\n{body} ")[1].split("\n}")[0]
  writers = whole_cache_producers(block, 2 * slots * 16)
  assert len(writers) == 2 * ours.config.n_layers, writers
  assert all("dynamic-update-slice" in w for w in writers), writers


@pytest.mark.parametrize("name, says", [("cudnn", "needs a GPU"), ("splash", "not implemented")])
def test_unavailable_backends_say_so(name, says):
  if name == "cudnn" and jax.default_backend() == "gpu":
    pytest.skip("a GPU is present")
  with pytest.raises(SphinxError, match=says):
    attention_backend(name)
  model = hf_llama(2)
  ours, params = ours_from(model, True, attention=name)
  with pytest.raises(SphinxError, match="config.model.llm.attention"):
    ours.apply({"params": params}, jnp.asarray(tokens(1, 4)), positions=arange_positions(1, 4))


def test_exactly_one_input():
  model = hf_llama(2)
  ours, params = ours_from(model, True)
  with pytest.raises(SphinxError, match="exactly one of tokens and embeddings"):
    ours.apply({"params": params}, positions=arange_positions(1, 4))


def test_parameter_tree_contract():
  """The tree the checkpoint/CLI code is written against: paths, shapes and logical axes."""
  llm = hf.llm_config_from_hf(hf_llama(2).config.to_dict())
  boxed = jax.eval_shape(lambda: Llama(llm).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32),
                                                 positions=jnp.zeros((1, 1), jnp.int32)))["params"]
  flat = traverse_util.flatten_dict(boxed, is_leaf=lambda _, x: isinstance(x, nn.Partitioned), sep="/")
  specs = {path: (box.value.shape, box.names) for path, box in flat.items()}
  L, D, F, V = 2, 64, 172, VOCAB
  assert specs == {
      "embed/embedding": ((V, D), ("vocab", "embed")),
      "layers/attention_norm/weight": ((L, D), ("layers", "embed")),
      "layers/attention/query/kernel": ((L, D, 64), ("layers", "embed", "heads")),
      "layers/attention/key/kernel": ((L, D, 32), ("layers", "embed", "kv_heads")),
      "layers/attention/value/kernel": ((L, D, 32), ("layers", "embed", "kv_heads")),
      "layers/attention/out/kernel": ((L, 64, D), ("layers", "heads", "embed")),
      "layers/ffn_norm/weight": ((L, D), ("layers", "embed")),
      "layers/mlp/gate/kernel": ((L, D, F), ("layers", "embed", "mlp")),
      "layers/mlp/up/kernel": ((L, D, F), ("layers", "embed", "mlp")),
      "layers/mlp/down/kernel": ((L, F, D), ("layers", "mlp", "embed")),
      "final_norm/weight": ((D,), ("embed",)),
      "lm_head/kernel": ((D, V), ("embed", "vocab")),
  }


def test_stack_and_unstack_layers_keep_the_model():
  model = hf_llama(2)
  _, scanned = ours_from(model, True)
  _, loop = ours_from(model, False)
  unstacked = unstack_layers(jax.tree.map(jnp.asarray, scanned), 2)
  jax.tree.map(np.testing.assert_array_equal, unstacked, loop)
  jax.tree.map(np.testing.assert_array_equal, stack_layers(unstacked, 2), scanned)
