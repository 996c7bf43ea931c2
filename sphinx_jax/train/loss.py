"""The original's training loss: next-token cross-entropy averaged over the labelled tokens of the batch.

accessory/model/meta.py: `CrossEntropyLoss(ignore_index=0)(logits[:, :-1], labels[:, 1:])` where labels are 0
outside assistant replies; here the mask is explicit (`loss_mask`), so a real token id 0 could still be trained.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits, tokens, loss_mask):
  """Mean CE of logits[:, t] predicting tokens[:, t+1] where loss_mask[:, t+1].

  Args: logits float[B, T, V] aligned with tokens int[B, T]; loss_mask bool[B, T] (True = trained target).
  Returns: (loss, metrics) with metrics {loss, accuracy, tokens}; 0 loss when nothing is labelled.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  weights = loss_mask[:, 1:].astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  count = jnp.sum(weights)
  denom = jnp.maximum(count, 1.0)
  loss = jnp.sum(nll * weights) / denom
  accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / denom
  return loss, {"loss": loss, "accuracy": accuracy, "tokens": count}
