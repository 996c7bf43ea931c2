"""Cached autoregressive decoding of the decoder in one jit: a prefill call, then a `lax.while_loop` of
single-token steps; mirrors the `forward_inference` + generate loop of LLaMA2-Accessory (`accessory/model/meta.py`).

Letters: B batch, P prompt length (left-padded), D width, V vocab, M max new tokens.
In:  tokens int[B, P] or a prefix float[B, P, D], segment_ids int[B, P] (0 = left padding).
Out: int32[B, M] new tokens; after a row emits `eos_id` it repeats `eos_id` (the loop stops once every row has).
`select(logits float[B, V], rng) -> int[B]` picks the next token: `greedy` here; samplers plug in the same way.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sphinx_jax.models.llama import Llama, init_cache, unstack_layers


def greedy(logits, rng):
  """The arg-max token, float[B, V] -> int32[B]; ignores rng."""
  del rng
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def prompt_positions(segment_ids):
  """RoPE positions of a left-padded prompt: 0 at its first real token. Example: [0, 0, 1, 1] -> [0, 0, 0, 1]."""
  return jnp.maximum(jnp.cumsum(segment_ids > 0, axis=1) - 1, 0).astype(jnp.int32)


def for_decoding(model: Llama, params):
  """The same decoder with unscanned layers (and its params), the faster layout for single-token steps: a scan
  slices each layer's weights out of the [L, ...] stack at every step (bench/decoder.py measures it)."""
  if not model.config.scan_layers:
    return model, params
  llm = model.config.copy_and_resolve_references()
  llm.scan_layers = False
  return model.clone(config=llm), unstack_layers(params, llm.n_layers)


def make_generate(model: Llama, max_new_tokens: int, *, select: Callable = greedy, eos_id: int | None = None):
  """A jitted `generate(params, tokens=None, *, embeddings=None, segment_ids=None, rng=None) -> int32[B, M]`.

  The cache holds P + M slots, so shapes (and the compiled program) depend only on B, P and M.
  """

  def generate(params, tokens=None, *, embeddings=None, segment_ids=None, rng=None):
    prompt = tokens if tokens is not None else embeddings
    batch, length = prompt.shape[:2]
    segment_ids = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids
    rng = jax.random.key(0) if rng is None else rng
    positions = prompt_positions(segment_ids)
    cache = init_cache(model.config, batch, length + max_new_tokens, model.dtype)
    logits, cache = model.apply({"params": params}, tokens, embeddings=embeddings, positions=positions,
                                segment_ids=segment_ids, cache=cache, last_only=True)
    rng, step_rng = jax.random.split(rng)
    first = select(logits[:, -1].astype(jnp.float32), step_rng)
    out = jnp.full((batch, max_new_tokens), -1 if eos_id is None else eos_id, jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((batch,), bool) if eos_id is None else first == eos_id

    def cond(state):
      step, _, _, _, done, _ = state
      return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
      step, out, cache, next_pos, done, rng = state
      last = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)
      logits, cache = model.apply({"params": params}, last, positions=next_pos[:, None], cache=cache)
      rng, step_rng = jax.random.split(rng)
      token = select(logits[:, -1].astype(jnp.float32), step_rng)
      if eos_id is not None:
        token = jnp.where(done, eos_id, token)
        done = done | (token == eos_id)
      out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
      return step + 1, out, cache, next_pos + 1, done, rng

    state = (jnp.int32(1), out, cache, positions[:, -1] + 1, done, rng)
    return jax.lax.while_loop(cond, body, state)[1]

  return jax.jit(generate)
