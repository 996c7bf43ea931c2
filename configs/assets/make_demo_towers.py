"""Regenerates `demo_towers/`: the demo's four tiny towers pre-trained on the synthetic world's shapes scenes.

Why: SPHINX trains on top of pretrained, frozen towers (CLIP, ConvNeXt, DINOv2, the BLIP-2 Q-Former); the demo's
towers are tiny and would otherwise be random, and random towers barely tell a circle from a square (a linear probe
on their tokens names an object's shape 59-64% of the time; NOTES.md). This script stands in for the released
towers' web-scale pretraining with a few minutes of dense supervision on the demo's own world, so the demo's
SPHINX stage learns to read features the way the original's does.

Objective (linear read-out heads on the towers' outputs; training the demo reads only the towers):
  each grid token of the fused stream [CLIP | ConvNeXt | DINOv2] (the demo's 8x8 grid at patch 28) predicts
    whether an object covers its patch centre and, on object patches, that object's shape (3), colour (6) and box
    (x1, y1, x2, y2 in [0, 1] of the padded square), the box both as numbers and as the 12 digits a REC answer
    prints ("0.52" -> 0, 5, 2 per coordinate; 10 classes each);
  the fused stream's first token and the mean Q-Former query each predict which (shape, colour) pairs the scene
    holds (18 binary labels) and how many of each shape (0..MAX_OBJECTS, a class per shape);
  and, with no learnable read-out, each grid token's projection on 50 fixed orthonormal directions of the fused
    stream (`code_basis`) equals CODE_SCALE x [object, colour one-hot, shape one-hot, the 4 printed tenths digits
    one-hot] (squared error, background included: there the code is zero).
Why the fixed code: to box the shape an expression names, the decoder must attend to that shape's tokens and copy
its box from them; tools/selective_copy_probe.py and the eleventh session's probe on these towers' own features
(NOTES.md) show the demo's decoder learns that selection when each token carries its box as a few clean one-hots
(even 72%-right ones), and not when the box is spread over the towers' learnt read-out directions: a held-out
"4 tenths right" of 0.68 / 0.18 / 0.10 on scenes of 1 / 2 / 3 shapes without the code (below picking a shape at
random: the decoder blends), 0.76 / 0.42 / 0.24 and 0.71 / 0.31 / 0.10 with it (two runs, two trainings of the
towers): better on 2 shapes, not yet on 3.
Why the digits and counts: with the box only as numbers, the demo's dim-128 decoder never learned to print boxes
(REC mean IoU 0.03-0.06 after 400 steps of REC alone): the towers carried the box in 0.5% of their output variance
(colour 41%, shape 19%), and turning a continuous feature into decimal digits is slow for a tiny decoder. Asking
for the answers' own digits (and counts) brings those closer to a look-up-and-copy, like colour. With these
towers the 1000-step demo reached REC 0.06 (mean IoU 0.14), VQA 0.66 and counting 0.46, against 0.00, 0.60 and
0.27 before (one run each, 96 samples; NOTES.md). A read-out that forced the box 5x louder (6% of the variance)
squeezed shape out (0.63) and did worse (VQA 0.51, REC 0.01).

Run from the repository root: python configs/assets/make_demo_towers.py (defaults: 1000 steps of 16 scenes of the
demo's world (configs/demo.py: 1-3 shapes, sides 0.25-0.45 of the shorter image side), peak lr 4e-3; 8 min on the
ninth session's 2-core box; held-out: object 0.995, shape 0.985, colour 0.999, box L1 0.022, printed digits 0.63 (a
coordinate within 0.02 in print: 0.38; the hundredths are at chance), counts 0.81, the code's tenths 0.76 on 18% of
the object tokens' energy — with lr 2e-3 the shape read-out was still at 0.58 after 600 steps).
Writes configs/assets/demo_towers/: a model directory (checkpoint.save_model_dir) holding the demo model's `towers`
tree and the read-out `heads` (kept so tests/test_demo_towers.py can re-score the towers on unseen scenes).
Deterministic up to XLA's floating-point reductions; the held-out scores land in its metadata.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from configs import demo
from sphinx_jax import checkpoint
from sphinx_jax.config import patch_grid
from sphinx_jax.data import image as image_data
from sphinx_jax.data import shapes, tasks
from sphinx_jax.models.sphinx import Towers, model_images, tower_views

OUT = Path(__file__).with_name("demo_towers")
PAIRS = tuple((s, c) for s in shapes.SHAPES for c in shapes.COLORS)
DIGITS = 12  # 4 coordinates x 3 printed digits ("0.52")
COUNTS = demo.MAX_OBJECTS + 1  # how many of one shape a scene holds: 0..MAX_OBJECTS
WORLD_SEED = 7  # scenes apart from the demo's training (0) and evaluation (10_000) worlds
# The code: [object, colour (6), shape (3), the 4 printed tenths digits (10 each)] along fixed directions.
CODE = 1 + len(shapes.COLORS) + len(shapes.SHAPES) + 4 * 10
CODE_SCALE = 3.0
CODE_SEED = 123


def printed_digits(norm_box) -> list[int]:
  """A box in [0, 1] -> the 12 digits its REC answer prints ('0.52' -> 0, 5, 2 for each of x1, y1, x2, y2)."""
  return [int(ch) for ch in tasks.format_coords(norm_box) if ch.isdigit()]


def dense_labels(frame: tasks.Frame, objects, grid: int) -> dict[str, np.ndarray]:
  """Per-patch and per-scene targets of one scene:
    shape, colour int[g*g]: 0 on background, counting from 1 in the world's order;
    box float[g*g, 4]: the object's box in the padded square (zero on background);
    digits int[g*g, 12]: the digits of that box as answers print it (`printed_digits`; zero on background);
    pairs float[18]: which (shape, colour) pairs the scene holds; counts int[3]: how many of each shape.

  A patch belongs to the object whose box holds its centre (boxes never overlap: the world keeps them apart).
  """
  centres = (np.arange(grid) + 0.5) / grid
  cx, cy = np.meshgrid(centres, centres)  # row-major like the tokens: row = y, column = x
  shape = np.zeros((grid, grid), np.int32)
  colour = np.zeros((grid, grid), np.int32)
  box = np.zeros((grid, grid, 4), np.float32)
  digits = np.zeros((grid, grid, DIGITS), np.int32)
  pairs = np.zeros(len(PAIRS), np.float32)
  for o in objects:
    norm = frame.normalise(o.box)
    x1, y1, x2, y2 = norm
    inside = (cx >= x1) & (cx < x2) & (cy >= y1) & (cy < y2)
    shape[inside] = shapes.SHAPES.index(o.shape) + 1
    colour[inside] = list(shapes.COLORS).index(o.color) + 1
    box[inside] = norm
    digits[inside] = printed_digits(norm)
    pairs[PAIRS.index((o.shape, o.color))] = 1.0
  counts = pairs.reshape(len(shapes.SHAPES), len(shapes.COLORS)).sum(axis=1).astype(np.int32)
  return {"shape": shape.reshape(-1), "colour": colour.reshape(-1), "box": box.reshape(-1, 4),
          "digits": digits.reshape(-1, DIGITS), "pairs": pairs, "counts": counts}


def scene_batch(world: shapes.World, start: int, count: int, size: int, grid: int, objects_out: list | None = None):
  """Scenes start..start+count-1 -> uint8 pixels [N, S, S, 3] and their stacked dense labels; appends each scene's
  (frame, shapes) to `objects_out` when given."""
  pixels, labels = [], []
  for i in range(start, start + count):
    img, size_wh, objects = world.scene(i, "shapes")
    frame = tasks.Frame(*size_wh)
    pixels.append(image_data.padded_resize(img, size))
    labels.append(dense_labels(frame, objects, grid))
    if objects_out is not None:
      objects_out.append((frame, objects))
  return np.stack(pixels), {key: np.stack([label[key] for label in labels]) for key in labels[0]}


def code_basis(channels: int) -> np.ndarray:
  """float[channels, CODE] orthonormal, fixed (seeded): the directions of the fused stream that must carry the code."""
  return np.linalg.qr(np.random.default_rng(CODE_SEED).normal(size=(channels, CODE)))[0].astype(np.float32)


def code_target(labels):
  """Per patch: CODE_SCALE x [object, colour one-hot, shape one-hot, the 4 tenths digits one-hot] (zero on
  background) -> float[..., CODE]."""
  on = (labels["shape"] > 0).astype(jnp.float32)[..., None]
  colour = jax.nn.one_hot(labels["colour"] - 1, len(shapes.COLORS))
  shape = jax.nn.one_hot(labels["shape"] - 1, len(shapes.SHAPES))
  tenths = jax.nn.one_hot(labels["digits"][..., 1::3], 10).reshape(*labels["digits"].shape[:-1], 40)
  return CODE_SCALE * on * jnp.concatenate([jnp.ones_like(on), colour, shape, tenths], axis=-1)


class Heads(nn.Module):
  """Linear read-outs of the towers' outputs (see the module docstring): -> a dict of logits / boxes, the grid
  tokens' projection on the code directions (`code`) and their squared norms (`energy`)."""

  @nn.compact
  def __call__(self, ensemble, queries):
    grid = ensemble[:, 1:]
    out = {"code": grid @ code_basis(grid.shape[-1]), "energy": jnp.sum(grid ** 2, axis=-1),
           "object": nn.Dense(1, name="object")(grid)[..., 0],
           "shape": nn.Dense(len(shapes.SHAPES), name="shape")(grid),
           "colour": nn.Dense(len(shapes.COLORS), name="colour")(grid),
           "box": nn.Dense(4, name="box")(grid),
           "digits": nn.Dense(DIGITS * 10, name="digits")(grid).reshape(*grid.shape[:2], DIGITS, 10)}
    scene = {"ensemble": ensemble[:, 0]}
    if queries is not None:
      scene["queries"] = jnp.mean(queries, axis=1)
    for name, features in scene.items():
      out[f"pairs_{name}"] = nn.Dense(len(PAIRS), name=f"pairs_{name}")(features)
      out[f"counts_{name}"] = nn.Dense(COUNTS * len(shapes.SHAPES), name=f"counts_{name}")(features).reshape(
          -1, len(shapes.SHAPES), COUNTS)
    return out


def losses(out, labels):
  """Objectness BCE over all patches; shape, colour and printed-digit cross-entropies and the L1 box error (x2.5)
  over object patches only (background would otherwise swamp them); the squared error of the code over all
  patches; the scene BCEs and count cross-entropies -> (total, parts)."""
  on = labels["shape"] > 0
  count = jnp.maximum(on.sum(), 1)
  on_object = lambda per_patch: jnp.sum(jnp.where(on, per_patch, 0.0)) / count
  class_loss = optax.softmax_cross_entropy_with_integer_labels
  parts = {"object": optax.sigmoid_binary_cross_entropy(out["object"], on.astype(jnp.float32)).mean(),
           "shape": on_object(class_loss(out["shape"], jnp.maximum(labels["shape"] - 1, 0))),
           "colour": on_object(class_loss(out["colour"], jnp.maximum(labels["colour"] - 1, 0))),
           "box": 2.5 * on_object(jnp.sum(jnp.abs(out["box"] - labels["box"]), axis=-1)),
           "digits": on_object(class_loss(out["digits"], labels["digits"]).mean(axis=-1)),
           "code": jnp.mean(jnp.sum((out["code"] - code_target(labels)) ** 2, axis=-1))}
  for name in ("ensemble", "queries"):
    if f"pairs_{name}" in out:
      parts[f"pairs_{name}"] = optax.sigmoid_binary_cross_entropy(out[f"pairs_{name}"], labels["pairs"]).mean()
      parts[f"counts_{name}"] = class_loss(out[f"counts_{name}"], labels["counts"]).mean()
  return sum(parts.values()), parts


def encode(towers, tower_params, pixels, model_config):
  """uint8 pixels [N, S, S, 3] -> the towers' (fused stream float[N, 1 + g*g, C], Q-Former queries or None)."""
  small, large = tower_views(model_images(pixels, model_config.image_size), model_config)
  return towers.apply({"params": tower_params}, small[:, 0], large[:, 0])


def build(model_config):
  """-> (towers, heads, forward(params, pixels) -> outputs) for the demo's model config."""
  towers, heads = Towers(model_config), Heads()

  def forward(params, pixels):
    return heads.apply({"params": params["heads"]}, *encode(towers, params["towers"], pixels, model_config))
  return towers, heads, forward


def accuracy(out, labels):
  """Objectness accuracy over all patches; on object patches: shape and colour accuracy, the mean box L1, the
  share of printed digits right and of printed coordinates within 0.02, the tenths digits the code holds (its
  largest entry per coordinate) and the share of the tokens' energy on their 7 true code directions (object,
  colour, shape, 4 tenths; ~7 / 224 for random tokens); per scene: count accuracy."""
  on = labels["shape"] > 0
  digits = np.argmax(out["digits"], -1)[on]
  code = np.asarray(out["code"])[on]
  hundredths = lambda d: d.reshape(-1, 4, 3) @ np.array([100, 10, 1])  # digits -> the 4 printed values x 100
  return {"object_acc": float(np.mean((np.asarray(out["object"]) > 0) == on)),
          "shape_acc": float(np.mean(np.argmax(out["shape"], -1)[on] + 1 == labels["shape"][on])),
          "colour_acc": float(np.mean(np.argmax(out["colour"], -1)[on] + 1 == labels["colour"][on])),
          "box_l1": float(np.mean(np.abs(np.asarray(out["box"]) - labels["box"])[on])),
          "digits_acc": float(np.mean(digits == labels["digits"][on])),
          "printed_within_0.02": float(np.mean(np.abs(hundredths(digits) - hundredths(labels["digits"][on])) <= 2)),
          "counts_acc": float(np.mean(np.argmax(out["counts_ensemble"], -1) == labels["counts"])),
          "code_tenths_acc": float(np.mean(np.argmax(code[:, CODE - 40:].reshape(-1, 4, 10), -1)
                                           == labels["digits"][on][:, 1::3])),
          "code_energy": float(np.sum(np.where(np.asarray(code_target(labels))[on] > 0, code, 0.0) ** 2)
                               / np.sum(np.asarray(out["energy"])[on]))}


def train(steps: int, batch: int, lr: float, seed: int = 0, log=print):
  """Pre-trains the demo's towers; -> ({"towers": …, "heads": …} params, held-out scores)."""
  model_config = demo.get_config().model
  size, grid = model_config.image_size, patch_grid(model_config)
  world = shapes.World(seed=WORLD_SEED, max_objects=demo.MAX_OBJECTS, object_sides=demo.OBJECT_SIDES)
  towers, heads, forward = build(model_config)
  pixels, labels = scene_batch(world, 0, 2, size, grid)
  key_towers, key_heads = jax.random.split(jax.random.key(seed))
  small, large = tower_views(model_images(pixels, size), model_config)
  params = {"towers": nn.meta.unbox(towers.init(key_towers, small[:, 0], large[:, 0])["params"])}
  ensemble, queries = towers.apply({"params": params["towers"]}, small[:, 0], large[:, 0])
  params["heads"] = heads.init(key_heads, ensemble, queries)["params"]
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 20, steps, lr / 10), weight_decay=1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, pixels, labels):
    (loss, parts), grads = jax.value_and_grad(lambda p: losses(forward(p, pixels), labels), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, parts

  held_out = scene_batch(world, 10_000_000, 256, size, grid)
  evaluate = jax.jit(forward)
  started = time.time()
  for i in range(steps):
    pixels, labels = scene_batch(world, i * batch, batch, size, grid)
    params, opt_state, parts = step(params, opt_state, pixels, labels)
    if (i + 1) % 50 == 0 or i + 1 == steps:
      log(f"step {i + 1}/{steps} ({time.time() - started:.0f} s): "
          + " ".join(f"{k} {float(v):.3f}" for k, v in parts.items()), flush=True)
  return params, accuracy(evaluate(params, held_out[0]), held_out[1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--lr", type=float, default=4e-3)
  parser.add_argument("--out", default=str(OUT))
  args = parser.parse_args()
  params, scores = train(args.steps, args.batch, args.lr)
  print("held-out:", " ".join(f"{k} {v:.3f}" for k, v in scores.items()))
  # The read-out heads travel along (tests/test_demo_towers.py re-scores them); training reads only `towers`.
  # Compressed: the directory lives in git and is read once per run.
  checkpoint.save_model_dir(args.out, jax.device_get(params), demo.get_config(), overwrite=True, compress=True,
                            metadata={"made_by": "configs/assets/make_demo_towers.py", "steps": args.steps,
                                      "batch": args.batch, "lr": args.lr, "held_out": scores})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
