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

`--world TOKENS` asks the same of the demo's world instead (NOTES.md, eleventh session): scenes of 1-3 shapes of
configs/demo.py (training world seed 0, a fresh scene per sample; held-out world seed 10000), the query names one
shape and the answer is its box's 8 printed digits (tenths and hundredths of x1, y1, x2, y2), the image tokens being
  towers: the 64 grid tokens of the fused stream of the demo's frozen towers (`--towers DIR`, default the committed
          configs/assets/demo_towers; ~5 min to encode the 38400 scenes of 1200 steps);
  ideal:  the probe's one-hot tokens for the patches each shape covers (the towers' training labels), noise 0.1;
  fuzzy:  the same with the towers' errors: each shape's tenths digits right 72% of the time (else a neighbour),
          its hundredths random.
Besides per-digit accuracy it prints, on 2-3-shape scenes, how many of the 8 digits match the named shape against
the best other shape (a reply that follows the expression: many / few) and how often all 4 tenths are right.

Run: JAX_PLATFORMS=cpu python tools/selective_copy_probe.py --alpha 0.1 --noise 0.01 [--whiten]  (~4 min / 1200
steps on 2 cores); JAX_PLATFORMS=cpu python tools/selective_copy_probe.py --world towers [--towers DIR]
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


def world_scenes(tokens: str, seed: int, count: int, towers_dir: str | None):
  """The demo world's scenes 0..count-1 -> (image tokens float[count, 64, F], per scene a list of its shapes as
  (colour, shape, the 8 printed digits))."""
  from configs import demo
  from configs.assets import make_demo_towers as towers_script
  from sphinx_jax import checkpoint
  from sphinx_jax.config import patch_grid
  from sphinx_jax.data import shapes
  model = demo.get_config().model
  world = shapes.World(seed=seed, max_objects=demo.MAX_OBJECTS, object_sides=demo.OBJECT_SIDES)
  if tokens == "towers":
    params = checkpoint.load_model_dir(towers_dir or demo.get_config().train.towers_from)[0]
    towers, _, _ = towers_script.build(model)
    encode = jax.jit(lambda pixels: towers_script.encode(towers, params["towers"], pixels, model)[0][:, 1:])
  rng, features, scene_objects = np.random.default_rng([seed, 1]), [], []
  for start in range(0, count, 64):
    framed = []
    pixels, labels = towers_script.scene_batch(world, start, min(64, count - start), model.image_size,
                                               patch_grid(model), framed)
    scene_objects += [[(list(shapes.COLORS).index(o.color), shapes.SHAPES.index(o.shape),
                        np.array(towers_script.printed_digits(frame.normalise(o.box)))[PRINTED]) for o in objects]
                      for frame, objects in framed]
    features.append(np.asarray(encode(pixels)) if tokens == "towers" else ideal_tokens(labels, tokens, rng))
  return np.concatenate(features), scene_objects


PRINTED = [1, 2, 4, 5, 7, 8, 10, 11]  # of the 12 printed digits: tenths and hundredths ("0.52" -> 5, 2)


def ideal_tokens(labels, tokens: str, rng):
  """Dense labels of a batch of scenes -> the probe's one-hot tokens float[N, 64, FEATURES] ('fuzzy': tenths right
  72% of the time per shape, else a neighbour; hundredths random per shape), + N(0, 0.1)."""
  on = labels["shape"] > 0
  digits = labels["digits"][..., PRINTED].copy()
  if tokens == "fuzzy":
    for n, ident in enumerate(labels["shape"] * 10 + labels["colour"]):
      for shape_id in np.unique(ident[on[n]]):
        patches = ident == shape_id
        for j in range(0, DIGITS, 2):
          tenths = digits[n, patches, j][0] + (rng.choice([-1, 1]) if rng.random() > 0.72 else 0)
          digits[n, patches, j], digits[n, patches, j + 1] = np.clip(tenths, 0, 9), rng.integers(10)
  features = np.zeros((*on.shape, FEATURES), np.float32)
  n, cell = np.nonzero(on)
  features[n, cell, 0] = 1.0
  features[n, cell, labels["colour"][n, cell]] = 1.0
  features[n, cell, COLOURS + labels["shape"][n, cell]] = 1.0
  for j in range(DIGITS):
    features[n, cell, 1 + COLOURS + SHAPES + 10 * j + digits[n, cell, j]] = 1.0
  return features + rng.normal(0, 0.1, features.shape).astype(np.float32)


def world_queries(rng, scene_objects, indices):
  """-> (text int[N, 11]: <colour> <shape> ':' 8 digits of a random shape of each scene, shapes per scene int[N],
  the other shapes' digits per sample)."""
  text, counts, others = np.zeros((len(indices), 3 + DIGITS), np.int32), np.zeros(len(indices), np.int32), []
  for k, i in enumerate(indices):
    named = rng.integers(len(scene_objects[i]))
    colour, shape, digits = scene_objects[i][named]
    text[k] = [10 + colour, 10 + COLOURS + shape, COLON, *digits]
    counts[k] = len(scene_objects[i])
    others.append([o[2] for j, o in enumerate(scene_objects[i]) if j != named])
  return text, counts, others


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


def selection_report(predicted, text, counts, others) -> str:
  """Held-out digit accuracy by shapes in the scene; with the other shapes' digits: on 2-3-shape scenes, digits
  matching the named shape / the best other one, and the share with all 4 tenths right."""
  right = predicted == text[:, 3:]
  report = "digit accuracy by objects " + " ".join(f"{n}: {right[counts == n].mean():.2f}" for n in (1, 2, 3))
  if others is None:
    return report
  best_other = np.array([max([(p == o).sum() for o in rest], default=0) for p, rest in zip(predicted, others)])
  tenths = right[:, ::2].all(axis=-1)
  return (report + "; digits named / other " + " ".join(
      f"{n}: {right[counts == n].sum(-1).mean():.1f} / {best_other[counts == n].mean():.1f}" for n in (2, 3))
      + "; 4 tenths right " + " ".join(f"{n}: {tenths[counts == n].mean():.2f}" for n in (1, 2, 3)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--alpha", type=float, default=1.0)
  parser.add_argument("--noise", type=float, default=0.1)
  parser.add_argument("--steps", type=int, default=1200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--whiten", action="store_true")
  parser.add_argument("--world", choices=("towers", "ideal", "fuzzy"), help="the demo world's scenes (docstring)")
  parser.add_argument("--towers", help="a model directory with the towers (--world towers)")
  args = parser.parse_args()
  rng, batch = np.random.default_rng(args.seed), 32
  started = time.time()
  if args.world:
    features, scene_objects = world_scenes(args.world, 0, batch * args.steps, args.towers)
    held_features, held_objects = world_scenes(args.world, 10_000, 512, args.towers)
    held_out = (held_features, *world_queries(np.random.default_rng(999), held_objects, np.arange(512)))
    train_batch = lambda i: (features[batch * i:batch * (i + 1)],
                             world_queries(rng, scene_objects, range(batch * i, batch * (i + 1)))[0])
    print(f"encoded {len(features)} scenes in {time.time() - started:.0f} s", flush=True)
  else:
    make = lambda r, n: scenes(r, n, args.alpha, args.noise)
    held_out = (*make(np.random.default_rng(999), 512), None)
    train_batch = lambda i: make(rng, batch)[:2]
  model = Probe()
  params = nn.meta.unbox(model.init(jax.random.key(args.seed), *(x[:2] for x in held_out[:2])))["params"]
  if args.whiten:
    params["Dense_0"] = whitened_dense(params["Dense_0"], held_out[0][:64] if args.world else
                                       scenes(np.random.default_rng(7), 64, args.alpha, args.noise)[0])
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
  for i in range(1, args.steps + 1):
    params, opt_state, loss = step(params, opt_state, *train_batch(i - 1))
    if i % max(args.steps // 6, 1) == 0 or i == args.steps:
      predicted = np.asarray(predict(params, *held_out[:2]))
      print(f"step {i} ({time.time() - started:.0f} s) loss {float(loss):.3f}; held-out "
            + selection_report(predicted, *held_out[1:]), flush=True)


if __name__ == "__main__":
  main()
