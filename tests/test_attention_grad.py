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


@pytest.mark.parametrize("blocks", [2, 3, 4])
def test_causal_query_blocks_equal_the_whole_attention(blocks):
  """Query row blocks against the keys up to each block's end (layers.causal_query_blocks): the same values and
  gradients on every row that sees a key, with packed segments, a padded key and 10 rows in uneven blocks."""
  rng = np.random.default_rng(1)
  b, t, n, kv_heads, h = 2, 10, 4, 2, 8
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((b, t, kv_heads, h)), jnp.float32) for _ in range(2))
  segments = jnp.asarray([[1] * 6 + [2] * 4, [0, 0] + [1] * 8])  # row 1: two padding slots first
  positions = jnp.asarray([list(range(6)) + list(range(4)), [0, 0] + list(range(8))])
  mask = layers.attention_mask(positions, positions, q_segments=segments, kv_segments=segments)
  mask &= jnp.tri(t, dtype=bool)
  seen = jnp.any(mask, axis=-1)  # padding rows see nothing: their output is a don't-care average
  weights = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) * seen[..., None, None]

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * weights)

  blocked = lambda q, k, v: layers.dot_product_attention(q, k, v, mask, causal_blocks=blocks)  # noqa: E731
  ours = jax.jit(jax.value_and_grad(loss(blocked), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.value_and_grad(loss(lambda q, k, v: plain_attention(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(float(ours[0]), float(ref[0]), rtol=1e-5, atol=1e-6)
  for g, r in zip(ours[1], ref[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(blocked(q, k, v) * seen[..., None, None]),
                             np.asarray(plain_attention(q, k, v, mask) * seen[..., None, None]), rtol=1e-5, atol=1e-6)


def test_causal_query_blocks_compute_fewer_logits():
  """The blocks leave the logits above the diagonal's blocks out: the compiled program's FLOPs fall."""
  q = k = v = jnp.ones((1, 64, 2, 8), jnp.float32)
  mask = jnp.tri(64, dtype=bool)[None]
  flops = {blocks: jax.jit(lambda q, k, v, n=blocks: layers.dot_product_attention(q, k, v, mask, causal_blocks=n))
           .lower(q, k, v).compile().cost_analysis()["flops"] for blocks in (1, 4)}
  assert flops[4] < 0.7 * flops[1], flops
