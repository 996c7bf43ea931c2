"""layers.dot_product_attention's custom backward (models/layers.py `_attend`) against autodiff of a plain
softmax attention written here: MHA and GQA, several queries (training) and one (a decode step), with a causal
mask, a padded key and a fully masked query row."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sphinx_jax.models import layers


def plain_attention(q, k, v, mask):
  """GQA by repeating KV heads; softmax over masked logits; float[B, T, N, H]."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
  logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("queries", [6, 1], ids=["prefill", "one query"])
def test_gradients_equal_autodiff_of_plain_attention(kv_heads, queries):
  rng = np.random.default_rng(0)
  b, s, n, h = 2, 6, 4, 8
  q = jnp.asarray(rng.standard_normal((b, queries, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, s, kv_heads, h)), jnp.float32) for _ in range(2))
  weights = jnp.asarray(rng.standard_normal((b, queries, n, h)), jnp.float32)
  kv_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  q_pos = kv_pos[:, s - queries:]
  valid = jnp.asarray(np.arange(s) != 2)[None].repeat(b, 0)  # key 2 is padding in both rows
  mask = layers.attention_mask(q_pos, kv_pos, kv_valid=valid)
  if queries > 1:
    mask = mask.at[1, 0].set(False)  # a query that sees nothing (e.g. a padded row) must not poison the rest

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask)) * weights)

  ours = jax.jit(jax.value_and_grad(loss(layers.dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.value_and_grad(loss(plain_attention), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(float(ours[0]), float(ref[0]), rtol=1e-5, atol=1e-6)
  for g, r in zip(ours[1], ref[1]):
    assert float(jnp.abs(r).max()) > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
