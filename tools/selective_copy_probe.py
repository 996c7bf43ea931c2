"""Can the demo's decoder learn REC's circuit (find the object an expression names, copy its box) when the image
tokens are ideal? A diagnostic for issue 6 (NOTES.md, tenth session); ours, no counterpart in LLaMA2-Accessory.

The demo's decoder (models/llama.py Llama: dim 128, 4 layers, 4 heads, lr 1e-3 with 50 warm-up steps and a cosine
to 1e-4, batch 32) reads a synthetic "image" of 64 grid tokens followed by a query:
  grid token: float[1 + 6 + 3 + 8 * 10] = [object?, colour one-hot, shape one-hot, 8 box digits one-hot * ALPHA]
              + N(0, NOISE) on every feature; 1-3 objects of distinct (colour, shape), each covering 3-6 random
              cells (the demo's 8x8 grid at patch 28 has ~5 per shape); Dense(-> 128) + LayerNorm, as visual_proj.
  text:       <colour> <shape> ':' then the named object's 8 digits (x1, y1, x2, y2, two digits each; random, so a
              blend of the objects' digits is worth nothing).
ALPHA sets how loud the box is beside colour and shape (the real demo towers: the box holds ~0.3% of their
object tokens' variance). Prints held-out digit accuracy on scenes of 1, 2 and 3 objects; with 2-3 objects a
model that reads one object without choosing the named one stays near (1 / objects) of its one-object score.
`--whiten` initialises the projection's kernel with the inverse square root of the features' covariance (from 64
scenes), so every input direction starts equally loud.

Run: JAX_PLATFORMS=cpu python tools/selective_copy_probe.py --alpha 0.1 --noise 0.01 [--whiten]  (~4 min / 1200
steps on 2 cores)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sphinx_jax import config as cfg  # noqa: E402
from sphinx_jax.models.llama import Llama  # noqa: E402

GRID, COLOURS, SHAPES, DIGITS = 64, 6, 3, 8
FEATURES = 1 + COLOURS + SHAPES + DIGITS * 10
COLON, BOS = 10 + COLOURS + SHAPES, 11 + COLOURS + SHAPES  # token ids: digits 0-9, colours, shapes, ':', BOS
VOCAB = BOS + 1
ANSWER_FROM = 1 + GRID + 2  # the logits at ':' onward predict the 8 digits (BOS, grid, colour, shape before)


def scenes(rng, count: int, alpha: float, noise: float):
  """-> (features float[count, 64, FEATURES], text int[count, 11], objects per scene int[count])."""
  features = np.zeros((count, GRID, FEATURES), np.float32)
  text = np.zeros((count, 3 + DIGITS), np.int32)
  objects = rng.integers(1, 4, count)
  for i, n in enumerate(objects):
    cells, named = rng.permutation(GRID), rng.integers(n)
    start = 0
    for j, pair in enumerate(rng.choice(COLOURS * SHAPES, n, replace=False)):
      digits, size = rng.integers(0, 10, DIGITS), rng.integers(3, 7)
      colour, shape = pair // SHAPES, pair % SHAPES
      token = np.zeros(FEATURES, np.float32)
      token[[0, 1 + colour, 1 + COLOURS + shape]] = 1.0
      token[1 + COLOURS + SHAPES + 10 * np.arange(DIGITS) + digits] = alpha
      features[i, cells[start:start + size]] = token
      start += size
      if j == named:
        text[i] = [10 + colour, 10 + COLOURS + shape, COLON, *digits]
  return features + rng.normal(0, noise, features.shape).astype(np.float32), text, objects


class Probe(nn.Module):
  """[BOS, LayerNorm(Dense(features)), text] -> the decoder's logits float[B, 1 + 64 + 11, VOCAB]."""

  @nn.compact
  def __call__(self, features, text):
    llm = cfg.llm_config(vocab_size=VOCAB, dim=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=128,
                         multiple_of=64)
    decoder = Llama(llm)
    image = nn.LayerNorm()(nn.Dense(128)(features))
    x = jnp.concatenate([decoder.embed(jnp.full((text.shape[0], 1), BOS)), image, decoder.embed(text)], axis=1)
    return decoder(embeddings=x, positions=jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))[0]


def whitened_dense(dense, features, rel_eps=1e-3):
  """The projection's kernel premultiplied by cov(features)^-1/2 (eigenvalues floored at rel_eps of the largest)
  and rescaled to its norm; the bias centres the features."""
  x = features.reshape(-1, features.shape[-1]).astype(np.float64)
  eigenvalues, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
  floor = rel_eps * eigenvalues.max()
  initial = np.asarray(dense["kernel"], np.float64)
  kernel = vectors @ np.diag(1 / np.sqrt(np.maximum(eigenvalues, 0) + floor)) @ vectors.T @ initial
  kernel *= np.linalg.norm(initial) / np.linalg.norm(kernel)
  return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(-x.mean(0) @ kernel, jnp.float32)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--alpha", type=float, default=1.0)
  parser.add_argument("--noise", type=float, default=0.1)
  parser.add_argument("--steps", type=int, default=1200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--whiten", action="store_true")
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  make = lambda r, n: scenes(r, n, args.alpha, args.noise)
  model = Probe()
  params = nn.meta.unbox(model.init(jax.random.key(args.seed), *make(rng, 2)[:2]))["params"]
  if args.whiten:
    params["Dense_0"] = whitened_dense(params["Dense_0"], make(np.random.default_rng(7), 64)[0])
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 50, args.steps, 1e-4)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
  opt_state = tx.init(params)

  def digit_logits(p, features, text):
    return model.apply({"params": p}, features, text)[:, ANSWER_FROM:ANSWER_FROM + DIGITS]

  @jax.jit
  def step(p, opt_state, features, text):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(digit_logits(p, features, text),
                                                                      text[:, 3:]).mean()
    value, grads = jax.value_and_grad(loss)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, value

  predict = jax.jit(lambda p, f, t: jnp.argmax(digit_logits(p, f, t), -1))
  held_out = make(np.random.default_rng(999), 512)
  started = time.time()
  for i in range(1, args.steps + 1):
    params, opt_state, loss = step(params, opt_state, *make(rng, 32)[:2])
    if i % max(args.steps // 6, 1) == 0 or i == args.steps:
      right = np.asarray(predict(params, *held_out[:2])) == held_out[1][:, 3:]
      by_objects = " ".join(f"{n}: {right[held_out[2] == n].mean():.2f}" for n in (1, 2, 3))
      print(f"step {i} ({time.time() - started:.0f} s) loss {float(loss):.3f}; held-out digit accuracy by objects "
            f"in the scene: {by_objects}", flush=True)


if __name__ == "__main__":
  main()
