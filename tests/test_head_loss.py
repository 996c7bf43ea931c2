"""models/head_loss.py (lm_head + cross-entropy in chunks, gradients in the forward pass) against plain autodiff of
log-softmax cross-entropy on full logits, alone and behind a tiny decoder; and the rows product of layers.dense."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sphinx_jax import config as cfg
from sphinx_jax.models import head_loss, layers
from sphinx_jax.models.llama import Llama

B, T, D, V = 2, 12, 16, 50


def reference_sum(hidden, kernel, targets, weights):
  """The unfused path: logits, log-softmax, gather; weighted sum."""
  log_probs = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden, kernel), axis=-1)
  return -jnp.sum(jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0] * weights)


@pytest.fixture
def case():
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  weights = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)  # ~30% ignored positions
  return hidden, kernel, targets, weights


@pytest.mark.parametrize("chunk_rows", [B * T, 8, 2], ids=["one chunk", "3 chunks", "12 chunks"])
def test_loss_and_grads_equal_autodiff_of_full_logits(case, chunk_rows):
  hidden, kernel, targets, weights = case
  fused = lambda h, k: head_loss.head_cross_entropy(h, k, targets, weights, chunk_rows=chunk_rows)[0]
  loss, (d_hidden, d_kernel) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(hidden, kernel)
  ref_loss, (ref_hidden, ref_kernel) = jax.value_and_grad(reference_sum, argnums=(0, 1))(hidden, kernel, targets,
                                                                                          weights)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(d_hidden), np.asarray(ref_hidden), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(d_kernel), np.asarray(ref_kernel), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(d_hidden)[np.asarray(weights) == 0] == 0)  # ignored positions get no gradient
  # Without differentiation the primal path (no gradients computed) gives the same loss.
  np.testing.assert_allclose(float(jax.jit(fused)(hidden, kernel)), float(ref_loss), rtol=1e-6)


def test_cotangent_scales_the_saved_gradients(case):
  """The loss as a mean (cotangent 1/count) and inside a larger expression (cotangent 3 cos(loss))."""
  hidden, kernel, targets, weights = case

  def outer(loss_fn):
    return lambda h, k: 3 * jnp.sin(loss_fn(h, k) / weights.sum())

  fused = outer(lambda h, k: head_loss.head_cross_entropy(h, k, targets, weights, chunk_rows=8)[0])
  plain = outer(lambda h, k: reference_sum(h, k, targets, weights))
  grads = jax.grad(fused, argnums=(0, 1))(hidden, kernel)
  ref = jax.grad(plain, argnums=(0, 1))(hidden, kernel)
  for g, r in zip(grads, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)


def test_correct_counts_weighted_argmax_hits(case):
  hidden, kernel, targets, weights = case
  logits = np.einsum("btd,dv->btv", np.asarray(hidden), np.asarray(kernel))
  targets = jnp.asarray(np.where(np.arange(T) % 2 == 0, logits.argmax(-1), np.asarray(targets)), jnp.int32)
  expected = np.sum((logits.argmax(-1) == np.asarray(targets)) * np.asarray(weights))
  assert expected >= 6  # the even positions hit wherever they are trained
  _, correct = head_loss.head_cross_entropy(hidden, kernel, targets, weights, chunk_rows=8)
  assert float(correct) == expected


@pytest.mark.parametrize("batch, length, rows, chunks", [(4, 512, 1024, 2), (4, 512, 1000, 4), (4, 512, 4096, 1),
                                                         (4, 512, 1, 512), (2, 12, 8, 3)])
def test_chunk_count_is_the_fewest_dividing_chunks_within_the_rows(batch, length, rows, chunks):
  assert head_loss.chunk_count(batch, length, rows) == chunks


def test_decoder_hidden_states_through_the_fused_loss_train_like_its_logits():
  """A tiny decoder: `return_hidden` + head_cross_entropy gives the loss and every parameter's gradient of the
  logits path (lm_head's kernel included); init with return_hidden still creates lm_head."""
  llm = cfg.llm_config(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32)
  model = Llama(llm)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, V, (B, T + 1)), jnp.int32)
  mask = jnp.asarray(rng.random((B, T)) > 0.2, jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  params = nn.unbox(model.init(jax.random.key(0), tokens[:, :-1], positions=positions, return_hidden=True))["params"]
  assert params["lm_head"]["kernel"].shape == (llm.dim, V)

  def via_logits(p):
    logits, _ = model.apply({"params": p}, tokens[:, :-1], positions=positions)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0] * mask) / mask.sum()

  def fused(p):
    hidden, _ = model.apply({"params": p}, tokens[:, :-1], positions=positions, return_hidden=True)
    nll, _ = head_loss.head_cross_entropy(hidden, p["lm_head"]["kernel"], tokens[:, 1:], mask, chunk_rows=8)
    return nll / mask.sum()

  loss, grads = jax.jit(jax.value_and_grad(fused))(params)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(via_logits))(params)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref_grads))
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6), grads, ref_grads)


def test_dense_on_rows_equals_the_product_on_every_axis():
  """layers.dense flattens leading axes for its product: same values and gradients as the [B, T, H, I] product."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 3, 5, 8)), jnp.float32)
  module = layers.dense(6, (None, None), "proj", use_bias=True)
  params = nn.unbox(module.init(jax.random.key(0), x))["params"]
  params["bias"] = jnp.asarray(rng.standard_normal(6), jnp.float32)

  def ours(p, x):
    return jnp.sum(jnp.sin(module.apply({"params": p}, x)))

  def plain(p, x):
    return jnp.sum(jnp.sin(jnp.einsum("bthi,io->btho", x, p["kernel"]) + p["bias"]))

  np.testing.assert_allclose(float(ours(params, x)), float(plain(params, x)), rtol=1e-6)
  for g, r in zip(jax.tree.leaves(jax.grad(ours, argnums=(0, 1))(params, x)),
                  jax.tree.leaves(jax.grad(plain, argnums=(0, 1))(params, x))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
