"""One training step: loss, grads, skipped update on non-finite values, metrics.

`apply_fn(params, batch) -> (hidden, aux)`: the decoder's final-norm output aligned with `batch["tokens"]` and an
auxiliary loss already weighted (the MoE load-balancing term, 0 for dense decoders); the loss is the original's
masked next-token cross-entropy of `lm_head` on it (train/loss.py, chunked: no [B, T, V] logits) plus `aux`. The step is pure; train/loop.py `build` wraps it in
one `jax.jit` with explicit in/out shardings and the state donated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sphinx_jax.train import loss as loss_lib
from sphinx_jax.train.optimizer import global_norm
from sphinx_jax.train.state import TrainState


def make_train_step(apply_fn, tx, schedule=None):
  """Returns step(state, batch) -> (state, metrics)."""
  def loss_fn(params, batch):
    hidden, aux = apply_fn(params, batch)
    head = params["llm"]["lm_head"]["kernel"]
    ce, metrics = loss_lib.next_token_loss(hidden, head, batch["tokens"], batch["loss_mask"])
    return ce + aux, dict(metrics, aux_loss=aux)

  def step(state: TrainState, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    grad_norm = global_norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    state = TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        nonfinite_in_row=jnp.where(finite, 0, state.nonfinite_in_row + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics = dict(metrics, grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
    if schedule is not None:
      metrics["lr"] = schedule(state.step - 1)
    return state, metrics

  return step

