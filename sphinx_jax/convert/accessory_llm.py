"""LLaMA2-Accessory decoder and SPHINX heads <-> our `llm/…` and `fusion/…` trees (merged shards, no `llma.`).

Mirrors the parameter names of accessory/model/LLM/llama_ens*.py (dense SwiGLU FFN) and
mixtral_sparse_ens*.py (Mixtral sparse FFN). RoPE needs no permutation: both sides use Meta's interleaved pairs.
Letters: L layers, V vocab, D dim, N heads, K KV heads, H head dim, F FFN hidden, E experts, C fused channels.

  accessory key                        shape         ours (scanned: leading [L]; else llm/layers_{i}/…)
  tok_embeddings.weight                [V, D]        llm/embed/embedding                  [V, D]
  layers.{i}.attention.wq|wk|wv.weight [N*H|K*H, D]  llm/layers/attention/query|key|value/kernel  [D, N*H|K*H]
  layers.{i}.attention.wo.weight       [D, N*H]      llm/layers/attention/out/kernel      [N*H, D]
  layers.{i}.attention_norm.weight     [D]           llm/layers/attention_norm/weight     [D]
  layers.{i}.ffn_norm.weight           [D]           llm/layers/ffn_norm/weight           [D]
  layers.{i}.feed_forward.w1|w3.weight [F, D]        llm/layers/mlp/gate|up/kernel        [D, F]
  layers.{i}.feed_forward.w2.weight    [D, F]        llm/layers/mlp/down/kernel           [F, D]
  norm.weight                          [D]           llm/final_norm/weight                [D]
  output.weight                        [V, D]        llm/lm_head/kernel                   [D, V]
MoE layers replace `feed_forward.w1|w2|w3.weight` with (no `.weight` suffix; expert e owns rows e*F..(e+1)*F-1):
  layers.{i}.feed_forward.gate.weight  [E, D]        llm/layers/moe/router/kernel         [D, E]
  layers.{i}.feed_forward.w1|w3        [E*F, D]      llm/layers/moe/gate|up               [E, D, F]
  layers.{i}.feed_forward.w2           [E*F, D]      llm/layers/moe/down                  [E, F, D] (h @ W2_e)
SPHINX heads (the `fusion/…` names that models/sphinx.py builds):
  visual_proj.0.weight | .0.bias       [D, C] | [D]  fusion/visual_proj/dense/kernel | bias  [C, D] | [D]
  visual_proj.1.weight | .1.bias       [D]           fusion/visual_proj/norm/scale | bias    [D]
  qformer_proj.{0,1}.*  (Q-Former variants only, C = 768)   fusion/qformer_proj/…  (same four leaves)
  start_img, end_img                   [1, 1, D]     fusion/start_img, fusion/end_img     [1, 1, D]

Arrays are numpy of any dtype (bf16 through ml_dtypes); every transform is a transpose or a reshape, so values
move bit-exactly both ways. Export transforms return views of our leaves (so zero-stride stand-ins give the
shapes for free), except the expert up-projections, which stay `Deferred` until written.
"""
from __future__ import annotations

from typing import Callable, Iterator

from sphinx_jax import config as cfg
from sphinx_jax.errors import SphinxError


def _same(w, _):
  return w


def _linear(w, _):  # torch [out, in] <-> flax [in, out]; its own inverse
  return w.T


def _experts_in(w, experts):  # [E*F, D] -> [E, D, F] (w1, w3: rows of expert e are its F outputs)
  return w.reshape(experts, -1, w.shape[-1]).transpose(0, 2, 1)


class Deferred:
  """An exported tensor whose transform must copy, computed only when written (`np.asarray`), so an export
  never holds every expert matrix twice. `shape` is known up front for the checks."""

  def __init__(self, shape, compute):
    self.shape, self.compute = tuple(shape), compute

  def __array__(self, dtype=None, copy=None):
    array = self.compute()
    return array if dtype is None else array.astype(dtype)


def _experts_in_back(w, _):  # [E, D, F] -> [E*F, D]; the transpose makes the reshape a copy
  return Deferred((w.shape[0] * w.shape[2], w.shape[1]), lambda: w.transpose(0, 2, 1).reshape(-1, w.shape[1]))


def _experts_out(w, experts):  # [E*F, D] -> [E, F, D] (w2 is stored [hidden, dim] per expert)
  return w.reshape(experts, -1, w.shape[-1])


def _experts_out_back(w, _):  # [E, F, D] -> [E*F, D]
  return w.reshape(-1, w.shape[-1])


# our path -> (accessory key, to ours, to accessory); layer entries are relative to llm/layers and layers.{i}.
LLM_TOP = {
    "llm/embed/embedding": ("tok_embeddings.weight", _same, _same),
    "llm/final_norm/weight": ("norm.weight", _same, _same),
    "llm/lm_head/kernel": ("output.weight", _linear, _linear),
}
LAYER_COMMON = {
    "attention_norm/weight": ("attention_norm.weight", _same, _same),
    "ffn_norm/weight": ("ffn_norm.weight", _same, _same),
    "attention/query/kernel": ("attention.wq.weight", _linear, _linear),
    "attention/key/kernel": ("attention.wk.weight", _linear, _linear),
    "attention/value/kernel": ("attention.wv.weight", _linear, _linear),
    "attention/out/kernel": ("attention.wo.weight", _linear, _linear),
}
LAYER_DENSE = {
    "mlp/gate/kernel": ("feed_forward.w1.weight", _linear, _linear),
    "mlp/up/kernel": ("feed_forward.w3.weight", _linear, _linear),
    "mlp/down/kernel": ("feed_forward.w2.weight", _linear, _linear),
}
LAYER_MOE = {
    "moe/router/kernel": ("feed_forward.gate.weight", _linear, _linear),
    "moe/gate": ("feed_forward.w1", _experts_in, _experts_in_back),
    "moe/up": ("feed_forward.w3", _experts_in, _experts_in_back),
    "moe/down": ("feed_forward.w2", _experts_out, _experts_out_back),
}


def _proj(name):
  return {
      f"fusion/{name}/dense/kernel": (f"{name}.0.weight", _linear, _linear),
      f"fusion/{name}/dense/bias": (f"{name}.0.bias", _same, _same),
      f"fusion/{name}/norm/scale": (f"{name}.1.weight", _same, _same),
      f"fusion/{name}/norm/bias": (f"{name}.1.bias", _same, _same),
  }


TAGS = {"fusion/start_img": ("start_img", _same, _same), "fusion/end_img": ("end_img", _same, _same)}


def layer_map(llm) -> dict:
  return {**LAYER_COMMON, **(LAYER_MOE if llm.get("moe") else LAYER_DENSE)}


def heads_map(towers) -> dict:
  """Fusion entries of a variant: visual_proj and tags always, qformer_proj with the Q-Former tower."""
  return {**_proj("visual_proj"), **(_proj("qformer_proj") if "qformer" in towers else {}), **TAGS}


def fused_channels(model) -> int:
  """C of visual_proj: [CLIP width | ConvNeXt last dim | DINOv2 width] over the towers in use."""
  widths = {"clip": lambda: model.clip.width, "convnext": lambda: model.convnext.dims[-1],
            "dinov2": lambda: model.dinov2.width}
  return sum(widths[t]() for t in model.towers if t in widths)


def expected_shapes(model) -> dict[str, tuple[int, ...]]:
  """Merged accessory key -> shape for the decoder and heads of `model` (a model config), in file order."""
  llm = model.llm
  d, v, hd = llm.dim, llm.vocab_size, llm.dim // llm.n_heads
  q, kv = llm.n_heads * hd, llm.n_kv_heads * hd
  shapes = {"start_img": (1, 1, d), "end_img": (1, 1, d), "tok_embeddings.weight": (v, d)}
  for i in range(llm.n_layers):
    p = f"layers.{i}."
    shapes.update({p + "attention.wq.weight": (q, d), p + "attention.wk.weight": (kv, d),
                   p + "attention.wv.weight": (kv, d), p + "attention.wo.weight": (d, q)})
    if llm.get("moe"):
      experts, f = llm.moe.num_experts, cfg.ffn_hidden_dim(llm)
      shapes.update({p + "feed_forward.w1": (experts * f, d), p + "feed_forward.w2": (experts * f, d),
                     p + "feed_forward.w3": (experts * f, d), p + "feed_forward.gate.weight": (experts, d)})
    else:
      f = cfg.ffn_hidden_dim(llm)
      shapes.update({p + "feed_forward.w1.weight": (f, d), p + "feed_forward.w2.weight": (d, f),
                     p + "feed_forward.w3.weight": (f, d)})
    shapes.update({p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,)})
  shapes.update({"norm.weight": (d,), "output.weight": (v, d)})
  projections = [("visual_proj", fused_channels(model))]
  if "qformer" in model.towers:
    projections.append(("qformer_proj", model.qformer.qformer.hidden))
  for name, channels in projections:
    shapes.update({f"{name}.0.weight": (d, channels), f"{name}.0.bias": (d,), f"{name}.1.weight": (d,),
                   f"{name}.1.bias": (d,)})
  return shapes


def sources(model) -> dict[str, tuple[tuple[str, ...], Callable, bool]]:
  """Our flat `llm/…` + `fusion/…` path -> (merged accessory keys, to-ours transform, stacked), in file order.

  A stacked leaf (model.llm.scan_layers: `llm/layers/…`, leading [L]) lists one key per layer; every other leaf
  (also `llm/layers_{i}/…` when unscanned) one key. The transform takes (array, experts).
  """
  llm = model.llm
  out = {ours: ((key,), to, False) for ours, (key, to, _) in {**LLM_TOP, **heads_map(model.towers)}.items()}
  for sub, (key, to, _) in layer_map(llm).items():
    keys = tuple(f"layers.{i}.{key}" for i in range(llm.n_layers))
    if llm.scan_layers:
      out[f"llm/layers/{sub}"] = (keys, to, True)
    else:
      out.update({f"llm/layers_{i}/{sub}": ((k,), to, False) for i, k in enumerate(keys)})
  return out


def experts(llm) -> int | None:
  """Experts per MoE layer (the expert-row merge rule needs it), None for a dense decoder."""
  return llm.moe.num_experts if llm.get("moe") else None


def to_accessory(flat: dict, model) -> Iterator[tuple[str, object]]:
  """Yields (merged accessory key, array) from our flat tree, popping the leaves it uses from `flat`.

  Scanned (`llm/layers/…` [L, …]) and unscanned (`llm/layers_{i}/…`) trees are both accepted.
  """
  llm = model.llm
  for ours, (key, _, back) in {**LLM_TOP, **heads_map(model.towers)}.items():
    yield key, back(_pop(flat, ours), None)
  scanned = any(k.startswith("llm/layers/") for k in flat)
  stacked = {sub: _pop(flat, f"llm/layers/{sub}") for sub in layer_map(llm)} if scanned else None
  for sub, w in (stacked or {}).items():
    if w.shape[0] != llm.n_layers:
      raise SphinxError(f"parameter tree: llm/layers/{sub} stacks {w.shape[0]} layers but model.llm.n_layers is "
                        f"{llm.n_layers}; the tree does not match its config.")
  for i in range(llm.n_layers):
    for sub, (key, _, back) in layer_map(llm).items():
      w = stacked[sub][i] if scanned else _pop(flat, f"llm/layers_{i}/{sub}")
      yield f"layers.{i}.{key}", back(w, None)


def _pop(flat, path):
  if path not in flat:
    raise SphinxError(f"parameter tree: no leaf {path!r} for the LLaMA2-Accessory export; the tree does not "
                      "match the model config (check model.llm / model.towers of the checkpoint).")
  return flat.pop(path)
