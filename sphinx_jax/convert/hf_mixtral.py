"""Hugging Face `MixtralForCausalLM` (transformers 4.57) <-> the MoE `Llama` parameter tree and config, both ways.

Attention, norms, embedding and head are LLaMA's (convert/hf.py: same keys, same q/k row permutation). Each layer's
`block_sparse_moe` holds per-expert tensors, which our tree stacks on a leading [E] axis (models/moe.py):
  model.layers.{i}.block_sparse_moe.gate.weight        [E, D]   moe/router/kernel  [D, E]
  model.layers.{i}.block_sparse_moe.experts.{e}.w1     [F, D]   moe/gate           [E, D, F]
  model.layers.{i}.block_sparse_moe.experts.{e}.w3     [F, D]   moe/up             [E, D, F]
  model.layers.{i}.block_sparse_moe.experts.{e}.w2     [D, F]   moe/down           [E, F, D]
(`.weight` after each expert key.) The walk of convert/hf.py sees one stacked key per expert weight
(`...experts.w1` [E, F, D], a `StackedExperts` view of the source) and on export the stacks are split back into
HF's per-expert keys in state_dict order. Transposes and stacks only, so both directions are bit-exact.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import ml_collections
import numpy as np

from sphinx_jax import config as cfg
from sphinx_jax.convert import hf
from sphinx_jax.errors import SphinxError

MOE = "model.layers.{i}.block_sparse_moe"
EXPERT_WEIGHTS = ("w1", "w2", "w3")  # HF's order inside one expert


def _experts(w, llm):
  """Stacked HF [E, out, in] <-> ours [E, in, out]; its own inverse."""
  return w.swapaxes(-1, -2)


EXPERTS = (_experts, _experts)
LAYER_KEYS = {  # HF state_dict order of a Mixtral block
    **{path: entry for path, entry in hf.LAYER_KEYS.items() if path.startswith("attention/")},
    "moe/router/kernel": (MOE + ".gate.weight", hf.LINEAR),
    "moe/gate": (MOE + ".experts.w1", EXPERTS),
    "moe/down": (MOE + ".experts.w2", EXPERTS),
    "moe/up": (MOE + ".experts.w3", EXPERTS),
    **{path: entry for path, entry in hf.LAYER_KEYS.items() if path.endswith("norm/weight")},
}


def _expert_key(stacked_key: str, e: int) -> str:
  """'...experts.w1' -> '...experts.{e}.w1.weight'."""
  head, _, weight = stacked_key.rpartition(".")
  return f"{head}.{e}.{weight}.weight"


def _stacked_key(key: str) -> str | None:
  """'model.layers.3.block_sparse_moe.experts.5.w2.weight' -> '...experts.w2'; None for other keys."""
  parts = key.split(".")
  if len(parts) == 8 and parts[3] == "block_sparse_moe" and parts[4] == "experts" and parts[-1] == "weight":
    return ".".join(parts[:5] + [parts[6]])
  return None


class StackedExperts(Mapping):
  """Read-only view of a Mixtral state dict whose per-expert keys appear as one stacked key per weight.

  Reads stay lazy: a stacked key reads its E tensors when asked for. Other keys pass through unchanged.
  """

  def __init__(self, source: Mapping[str, Any], num_experts: int):
    self.source, self.num_experts = source, num_experts
    self._keys = list(dict.fromkeys(_stacked_key(k) or k for k in source.keys()))

  def __iter__(self):
    return iter(self._keys)

  def __len__(self):
    return len(self._keys)

  def __contains__(self, key):
    return key in self._keys

  def __getitem__(self, key):
    if key not in self._keys:
      raise KeyError(key)
    if not key.startswith("model.layers.") or ".experts." not in key:
      return self.source[key]
    parts = []
    for e in range(self.num_experts):
      name = _expert_key(key, e)
      if name not in self.source:
        raise SphinxError(f"HF checkpoint: missing tensor {name!r}; a Mixtral layer needs {self.num_experts} "
                          "experts (num_local_experts of its config).")
      parts.append(np.asarray(self.source[name]))
      if parts[-1].shape != parts[0].shape:
        raise SphinxError(f"HF checkpoint: tensor {name!r} has shape {parts[-1].shape}, expert 0 has "
                          f"{parts[0].shape}; check the config that came with it.")
    return np.stack(parts)

  def extra_experts(self) -> list[str]:
    """Expert keys numbered num_experts or more (no stacked read consumes them)."""
    return sorted(k for k in self.source.keys() if _stacked_key(k) and int(k.split(".")[5]) >= self.num_experts)


# --- configs -----------------------------------------------------------------------------------------------

def llm_config_from_hf(hf_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """transformers MixtralConfig fields (e.g. config.json) -> our MoE llm config; unexpressible fields raise."""
  c = dict(hf_config)
  if c.get("model_type") != "mixtral":
    hf._reject("model_type", c.get("model_type"), "only 'mixtral' checkpoints convert here.")
  if c.get("sliding_window") is not None:
    hf._reject("sliding_window", c["sliding_window"], "the original attends over the whole sequence.")
  llama = hf.llm_config_from_hf({**c, "model_type": "llama", "attention_bias": False, "mlp_bias": False})
  top_k = int(c["num_experts_per_tok"])
  # HF's aux loss is top_k times the original's (it averages the expert mask over tokens, not token copies).
  weight = float(c.get("router_aux_loss_coef", 0.0)) * top_k if c.get("output_router_logits") else 0.0
  return cfg.mixtral_config(**{**llama.to_dict(), "hidden_dim": int(c["intermediate_size"]),
                               "moe": dict(num_experts=int(c["num_local_experts"]), top_k=top_k,
                                           load_balancing_weight=weight)})


def hf_config_from_llm(llm) -> dict:
  """Our MoE llm config -> transformers 4.57 MixtralConfig fields (save as config.json)."""
  if not llm.get("moe"):
    raise SphinxError("config.model.llm.moe is not set: a dense decoder exports as LlamaForCausalLM (convert/hf.py).")
  if llm.rope_scaling is not None:
    raise SphinxError(f"config.model.llm.rope_scaling={llm.rope_scaling}: MixtralConfig has no rope scaling; "
                      "export a model trained without it.")
  return dict(
      architectures=["MixtralForCausalLM"], model_type="mixtral", **hf.decoder_fields(llm), sliding_window=None,
      num_local_experts=llm.moe.num_experts, num_experts_per_tok=llm.moe.top_k, router_jitter_noise=0.0,
      output_router_logits=llm.moe.load_balancing_weight > 0,
      router_aux_loss_coef=llm.moe.load_balancing_weight / llm.moe.top_k)


# --- parameters --------------------------------------------------------------------------------------------

def params_from_hf(source: Mapping[str, Any], llm, scan_layers: bool) -> dict:
  """HF Mixtral tensors (a Mapping, read lazily) -> our nested numpy tree; every source key must be consumed."""
  view = StackedExperts(source, llm.moe.num_experts)
  if extra := view.extra_experts():
    raise SphinxError(f"HF checkpoint: {len(extra)} expert tensor(s) beyond num_local_experts="
                      f"{llm.moe.num_experts}, e.g. {extra[:3]}; is the config right?")
  return hf.params_from_hf(view, llm, scan_layers, LAYER_KEYS)


def hf_from_params(params: Mapping[str, Any], llm) -> Iterator[tuple[str, np.ndarray]]:
  """Our MoE tree -> (HF key, array) one tensor at a time, in MixtralForCausalLM state_dict order.

  The three stacked expert weights of a layer are held until all are seen, then split expert by expert.
  """
  pending = {}
  for key, array in hf.hf_from_params(params, llm, LAYER_KEYS):
    if ".experts." not in key:
      yield key, array
      continue
    pending[key.rpartition(".")[2]] = (key, array)
    if len(pending) == len(EXPERT_WEIGHTS):
      for e in range(llm.moe.num_experts):
        for weight in EXPERT_WEIGHTS:
          stacked_key, stacked = pending[weight]
          yield _expert_key(stacked_key, e), np.ascontiguousarray(stacked[e])
      pending = {}
