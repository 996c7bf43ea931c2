"""The original's training loss: next-token cross-entropy averaged over the labelled tokens of the batch.

accessory/model/meta.py: `CrossEntropyLoss(ignore_index=0)(logits[:, :-1], labels[:, 1:])` where labels are 0
outside assistant replies; here the mask is explicit (`loss_mask`), so a real token id 0 could still be trained.
"""
from __future__ import annotations

import jax.numpy as jnp

from sphinx_jax.models.head_loss import head_cross_entropy


def next_token_loss(hidden, head, tokens, loss_mask):
  """Mean CE of the head's logits at t (`hidden[:, t] @ head`) predicting tokens[:, t+1] where loss_mask[:, t+1].

  The head and the loss run in chunks of positions (models/head_loss.py): the [B, T, V] logits never exist.
  Args: hidden float[B, T, D] (the decoder's final norm output) aligned with tokens int[B, T]; head float[D, V]
  (lm_head's kernel); loss_mask bool[B, T] (True = trained target).
  Returns: (loss, metrics) with metrics {loss, accuracy, tokens}; 0 loss when nothing is labelled.
  """
  weights = loss_mask[:, 1:].astype(jnp.float32)
  nll, correct = head_cross_entropy(hidden[:, :-1], head, tokens[:, 1:], weights)
  count = jnp.sum(weights)
  denom = jnp.maximum(count, 1.0)
  loss = nll / denom
  return loss, {"loss": loss, "accuracy": correct / denom, "tokens": count}
