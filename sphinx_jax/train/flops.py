"""Analytic FLOPs per training step, for MFU (DESIGN.md "Performance method").

MFU = model FLOPs per step / (step time x peak FLOP/s), with
  model FLOPs = 6 * N_trainable_path * T                      (decoder + fusion, forward and backward)
              + 6 * n_layers * T_attn                         (causal attention: 12 * L * D * S^2 / 2 per row,
                                                               i.e. 6 * L * D * S per row of length S, x rows)
              + 2 * N_tower * tokens_per_view * views * rows  (frozen towers, forward only; exact for ViTs,
                                                               an approximation for ConvNeXt's convolutions)
where T = rows x sequence length (every position is computed, padded or not) and N_trainable_path counts
the decoder's parameters without the embedding table (a gather, not a matmul) plus the fusion projections.
`cost_analysis()` is not used: it counts a scanned layer body once.
"""
from __future__ import annotations

import numpy as np
from flax import traverse_util


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in traverse_util.flatten_dict(tree).values())


def step_flops(params, model_config, rows: int, seq_len: int) -> float:
  """FLOPs of one train step over `rows` sequences of `seq_len` positions (image positions included)."""
  llm = params["llm"]
  n_path = _count(llm) - _count(llm.get("embed", {})) + _count(params.get("fusion", {}))
  tokens = rows * seq_len
  attention = 6.0 * model_config.llm.n_layers * model_config.llm.dim * seq_len * tokens
  towers = params.get("towers", {})
  tower_flops = 2.0 * _count(towers) * 257 * model_config.views * rows if towers else 0.0
  return 6.0 * n_path * tokens + attention + tower_flops
