"""Hugging Face `LlamaForCausalLM` (transformers 4.57) <-> the `Llama` parameter tree and config, both ways.

Mirrors the key mapping and q/k row permutation of LLaMA2-Accessory `accessory/tools/convert_weights_to_hf.py`,
written as data: one key map (our path -> HF key, `{i}` = layer) and small named transforms with their inverses.
Shapes: HF linear weights are [out, in] (our kernels [in, out]); HF q/k rows are in rotate-half order per head,
ours (Meta, interleaved pairs) are `permute_rows` of them. Everything is a transpose or a permutation, so both
directions are bit-exact and keep the source dtype.
Our tree: `layers/...` with a leading [L] axis when scanned, else `layers_0/...`; see models/llama.py.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util

from sphinx_jax import config as cfg
from sphinx_jax.errors import SphinxError


# --- transforms: (hf array, llm) -> our leaf, and back; array methods only, so eval_shape can trace them ----

def _identity(w, llm):
  return w


def _linear(w, llm):
  return w.T


def _heads_to_meta(w, heads):
  """HF rotate-half rows [heads*H, D] -> Meta interleaved rows: per head, halves (a | b) -> pairs (a0 b0 a1 b1 ..)."""
  rows, cols = w.shape
  return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _heads_to_hf(w, heads):
  """Inverse of `_heads_to_meta` (accessory's convert_weights_to_hf permutation)."""
  rows, cols = w.shape
  return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _query_to_ours(w, llm):
  return _heads_to_meta(w, llm.n_heads).T


def _query_to_hf(w, llm):
  return _heads_to_hf(w.T, llm.n_heads)


def _key_to_ours(w, llm):
  return _heads_to_meta(w, llm.n_kv_heads).T


def _key_to_hf(w, llm):
  return _heads_to_hf(w.T, llm.n_kv_heads)


IDENTITY = (_identity, _identity)
LINEAR = (_linear, _linear)
QUERY = (_query_to_ours, _query_to_hf)
KEY = (_key_to_ours, _key_to_hf)

# our path -> (HF key, (to_ours, to_hf)); HF state_dict order.
GLOBAL_KEYS = {
    "embed/embedding": ("model.embed_tokens.weight", IDENTITY),
    "final_norm/weight": ("model.norm.weight", IDENTITY),
    "lm_head/kernel": ("lm_head.weight", LINEAR),
}
LAYER_KEYS = {  # path inside one block
    "attention/query/kernel": ("model.layers.{i}.self_attn.q_proj.weight", QUERY),
    "attention/key/kernel": ("model.layers.{i}.self_attn.k_proj.weight", KEY),
    "attention/value/kernel": ("model.layers.{i}.self_attn.v_proj.weight", LINEAR),
    "attention/out/kernel": ("model.layers.{i}.self_attn.o_proj.weight", LINEAR),
    "mlp/gate/kernel": ("model.layers.{i}.mlp.gate_proj.weight", LINEAR),
    "mlp/up/kernel": ("model.layers.{i}.mlp.up_proj.weight", LINEAR),
    "mlp/down/kernel": ("model.layers.{i}.mlp.down_proj.weight", LINEAR),
    "attention_norm/weight": ("model.layers.{i}.input_layernorm.weight", IDENTITY),
    "ffn_norm/weight": ("model.layers.{i}.post_attention_layernorm.weight", IDENTITY),
}


# --- configs -----------------------------------------------------------------------------------------------

def _reject(field, value, why):
  raise SphinxError(f"HF config field {field}={value!r}: {why}")


def _rope_scaling_from_hf(rope_scaling):
  """HF linear scaling divides positions by `factor`; accessory multiplies them by `rope_scaling`."""
  if rope_scaling is None:
    return None
  kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
  if kind == "default":
    return None
  if kind != "linear":
    _reject("rope_scaling", rope_scaling, "only linear scaling (or none) exists in the original; "
            "convert a model trained with it.")
  return 1.0 / float(rope_scaling["factor"])


def llm_config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """transformers LlamaConfig fields (a dict, e.g. config.json) -> our llm config; unexpressible fields raise."""
  c = dict(hf_config)
  if c.get("model_type", "llama") != "llama":
    _reject("model_type", c.get("model_type"), "only 'llama' checkpoints convert here.")
  for field, ours in (("tie_word_embeddings", False), ("attention_bias", False), ("mlp_bias", False),
                      ("hidden_act", "silu")):
    if c.get(field, ours) != ours:
      _reject(field, c[field], f"the original decoder only has {field}={ours!r}.")
  dim, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
  if c.get("head_dim") not in (None, dim // heads):
    _reject("head_dim", c["head_dim"], f"the original uses hidden_size / num_attention_heads = {dim // heads}.")
  llm = cfg.llm_config(
      vocab_size=int(c["vocab_size"]), dim=dim, n_layers=int(c["num_hidden_layers"]), n_heads=heads,
      n_kv_heads=int(c.get("num_key_value_heads") or heads), norm_eps=float(c["rms_norm_eps"]),
      rope_theta=float(c.get("rope_theta", 10000.0)), rope_scaling=_rope_scaling_from_hf(c.get("rope_scaling")),
      max_seq_len=int(c["max_position_embeddings"]))
  # The original derives the FFN width from dim; keep that rule when it reproduces the checkpoint's width.
  if cfg.ffn_hidden_dim(llm) != int(c["intermediate_size"]):
    llm.hidden_dim = int(c["intermediate_size"])
  return llm


def hf_config_from_llm(llm) -> dict:
  """Our llm config -> transformers 4.57 LlamaConfig fields (save as config.json)."""
  if llm.get("moe"):
    raise SphinxError("config.model.llm.moe is set: a Mixtral decoder has no LlamaForCausalLM form; export the "
                      "whole model to accessory instead.")
  return dict(
      architectures=["LlamaForCausalLM"], model_type="llama", **decoder_fields(llm),
      rope_scaling=None if llm.rope_scaling is None else {"rope_type": "linear",
                                                           "factor": 1.0 / llm.rope_scaling},
      attention_bias=False, mlp_bias=False, pretraining_tp=1)


def decoder_fields(llm) -> dict:
  """The config.json fields LlamaConfig and MixtralConfig share, from our llm config."""
  return dict(
      hidden_act="silu", vocab_size=llm.vocab_size, hidden_size=llm.dim, intermediate_size=cfg.ffn_hidden_dim(llm),
      num_hidden_layers=llm.n_layers, num_attention_heads=llm.n_heads, num_key_value_heads=llm.n_kv_heads,
      head_dim=llm.dim // llm.n_heads, rms_norm_eps=llm.norm_eps, rope_theta=llm.rope_theta,
      max_position_embeddings=llm.max_seq_len, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


# --- parameters --------------------------------------------------------------------------------------------

def _block_shapes(llm) -> dict[str, tuple[int, ...]]:
  """Our leaf shapes by path (global paths, and block paths of one layer), traced from the model itself."""
  from sphinx_jax.models.llama import Llama  # the model is the contract; imported late to keep this light
  one = ml_collections.ConfigDict(llm.to_dict())
  one.update(dict(n_layers=1, scan_layers=False, remat_policy="none", attention="xla"))  # shapes only
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  tree = jax.eval_shape(lambda t: Llama(one).init(jax.random.key(0), t, positions=t), tokens)["params"]
  flat = traverse_util.flatten_dict(nn.meta.unbox(tree), sep="/")
  return {path.removeprefix("layers_0/"): leaf.shape for path, leaf in flat.items()}


def _hf_shape(our_shape, to_hf, llm):
  return jax.eval_shape(lambda w: to_hf(w, llm), jax.ShapeDtypeStruct(our_shape, jnp.float32)).shape


def _read(source, key, expected_shape):
  if key not in source:
    raise SphinxError(f"HF checkpoint: missing tensor {key!r} (shape {tuple(expected_shape)}); is it a "
                      f"LlamaForCausalLM checkpoint of this config?")
  array = np.asarray(source[key])
  if array.shape != tuple(expected_shape):
    raise SphinxError(f"HF checkpoint: tensor {key!r} has shape {array.shape}, the config expects "
                      f"{tuple(expected_shape)}; check the config that came with it.")
  return array


def _set(tree, path, value):
  *parents, leaf = path.split("/")
  for name in parents:
    tree = tree.setdefault(name, {})
  tree[leaf] = value


def _get(tree, path):
  for name in path.split("/"):
    tree = tree[name]
  return tree


def params_from_hf(source: Mapping[str, Any], llm, scan_layers: bool, layer_keys=LAYER_KEYS) -> dict:
  """HF tensors (any Mapping key -> array-like, read lazily one key at a time) -> our nested numpy tree.

  Peak memory is about one stacked leaf ([L, ...] when scanned). Every source key must be consumed.
  `layer_keys` is the per-block map (convert/hf_mixtral.py passes Mixtral's).
  """
  shapes = _block_shapes(llm)
  params, consumed = {}, set()
  for path, (key, (to_ours, to_hf)) in GLOBAL_KEYS.items():
    _set(params, path, np.ascontiguousarray(to_ours(_read(source, key, _hf_shape(shapes[path], to_hf, llm)), llm)))
    consumed.add(key)
  for path, (pattern, (to_ours, to_hf)) in layer_keys.items():
    hf_shape, stacked = _hf_shape(shapes[path], to_hf, llm), None
    for i in range(llm.n_layers):
      key = pattern.format(i=i)
      leaf = to_ours(_read(source, key, hf_shape), llm)
      consumed.add(key)
      if not scan_layers:
        _set(params, f"layers_{i}/{path}", np.ascontiguousarray(leaf))
        continue
      if stacked is None:  # filled in place: no second copy of the stacked leaf
        stacked = np.empty((llm.n_layers, *leaf.shape), leaf.dtype)
      stacked[i] = leaf
    if scan_layers:
      _set(params, f"layers/{path}", stacked)
  unused = sorted(set(source.keys()) - consumed)
  if unused:
    raise SphinxError(f"HF checkpoint: {len(unused)} tensor(s) with no place in the decoder, e.g. {unused[:5]}; "
                      "is the config right (layers, tied embeddings)?")
  return params


def hf_from_params(params: Mapping[str, Any], llm, layer_keys=LAYER_KEYS) -> Iterator[tuple[str, np.ndarray]]:
  """Our tree (scanned or not, numpy or jax leaves) -> (HF key, array) one tensor at a time, HF order."""
  scanned = "layers" in params

  def block_leaf(path, i):
    return _get(params, f"layers/{path}")[i] if scanned else _get(params, f"layers_{i}/{path}")

  key, (_, to_hf) = GLOBAL_KEYS["embed/embedding"]
  yield key, np.ascontiguousarray(to_hf(np.asarray(_get(params, "embed/embedding")), llm))
  for i in range(llm.n_layers):
    for path, (pattern, (_, to_hf)) in layer_keys.items():
      yield pattern.format(i=i), np.ascontiguousarray(to_hf(np.asarray(block_leaf(path, i)), llm))
  for path in ("final_norm/weight", "lm_head/kernel"):
    key, (_, to_hf) = GLOBAL_KEYS[path]
    yield key, np.ascontiguousarray(to_hf(np.asarray(_get(params, path)), llm))
