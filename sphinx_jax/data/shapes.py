"""A synthetic multi-task world with exact ground truth: the demo's embedded data and the tests' data.

Ours (no counterpart in LLaMA2-Accessory). Three kinds of scene, drawn with PIL, each a pure function of
(seed, index): coloured shapes (circle, square, triangle) placed without overlap, stick-figure people with
COCO-17 keypoints, and document pages with title/text/list/table/figure blocks. Image sizes and aspect
ratios vary, so the padding to a square matters for every box. Two domains render the same scene: "flat"
(plain colours) and "textured" (a brightness ramp and grey noise over everything), for the domain
weight-mixing recipe.

`World(seed, domain).sample(index, task) -> (PIL.Image, Record, truth)`: random access by index, as a Grain
MapDataset needs; all tasks asked about one kind of scene at one index see the same image. The Record's
conversation is rendered with `data/tasks.py` and its image is BMP bytes (lossless and fast to encode);
`truth` is a dict in pixels of the original image (see `World.sample`); `WorldSource` serves Records by index.
`as_text` serves the same shapes scenes described in words (`describe`) instead of drawn, for text-only training.
Writers put samples on disk in the formats the readers of `data/sources.py` consume: LLaMA2-Accessory
conversations, COCO (instances, refs, person keypoints, layout) and VQAv2 (questions + annotations).
Boxes are [x1, y1, x2, y2] pixel edges: a shape drawn on pixels x0..x0+s-1 has the box [x0, ., x0+s, .];
COCO files store [x, y, w, h].
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from sphinx_jax.data import tasks
from sphinx_jax.data.record import Record
from sphinx_jax.errors import SphinxError

COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 200), "yellow": (240, 200, 20),
          "purple": (148, 80, 189), "orange": (255, 127, 14)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
DOMAINS = ("flat", "textured")
WORLD_TASKS = ("conversation", "vqa", "rec", "reg", "grounded_caption", "detection", "layout", "pose")
BACKGROUND = (232, 232, 226)
PAPER = (255, 255, 255)
SKIN = (238, 200, 170)
OCCLUDER = (120, 100, 80)
PUBLAYNET_IDS = {"text": 1, "title": 2, "list": 3, "table": 4, "figure": 5}
SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
            (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))  # COCO's, 1-based
_KIND = {"shapes": 1, "people": 2, "document": 3}
OBJECT_SIDES = (0.14, 0.3)  # a shape's side as a fraction of the image's shorter side
VQA_SUBTYPE = "shapes2026"


def kind_of(task: str) -> str:
  """Which scene a task is asked about."""
  return {"pose": "people", "layout": "document"}.get(task, "shapes")


@dataclasses.dataclass(frozen=True)
class Shape:
  shape: str
  color: str
  box: tuple  # pixel edges (x1, y1, x2, y2)

  @property
  def name(self) -> str:
    return f"{self.color} {self.shape}"

  @property
  def centre(self) -> tuple[float, float]:
    return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclasses.dataclass(frozen=True)
class Person:
  box: tuple                # encloses the whole drawn figure, occluded parts included (a pixel or two loose)
  keypoints: np.ndarray     # float[17, 3]: x, y, v (2 visible, 1 hidden behind an occluder), COCO-17 order
  color: str
  scale: float              # drawn height of the unit figure, pixels


@dataclasses.dataclass(frozen=True)
class Block:
  cls: str                  # one of tasks.LAYOUT_CLASSES
  box: tuple


# --------------------------------------------------------------------------------------------- scenes
def _size(rng, lo, hi, aspect=None):
  w = int(rng.integers(lo, hi + 1))
  h = int(rng.integers(lo, hi + 1)) if aspect is None else int(round(w * aspect))
  return w, h


def shapes_scene(rng, lo, hi, max_objects=5, object_sides=OBJECT_SIDES):
  """-> ((W, H), [Shape]): 1-max_objects shapes, distinct (colour, shape) pairs, boxes at least 4 px apart, each
  side a fraction in object_sides (lo, hi) of the image's shorter side."""
  size = _size(rng, lo, hi)
  w, h = size
  pairs = [(s, c) for s in SHAPES for c in COLORS]
  picks = rng.choice(len(pairs), size=int(rng.integers(1, max_objects + 1)), replace=False)
  placed = []
  for p in picks:
    for _ in range(30):  # rejection sampling; a shape that finds no room is left out
      side = int(rng.integers(int(object_sides[0] * min(size)), int(object_sides[1] * min(size)) + 1))
      x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
      box = (x, y, x + side, y + side)
      if all(_apart(box, o.box, 4) for o in placed):
        placed.append(Shape(pairs[p][0], pairs[p][1], box))
        break
  return size, placed


def _apart(a, b, gap):
  return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


# A figure of height 1 facing the viewer (its left is the image's right), origin at the top of the head.
_HEAD = 0.09


def _figure(rng):
  """float[17, 2] keypoints of a unit-height figure with random arm and leg angles."""
  r, cx = _HEAD, 0.0
  hy = r
  pts = {"nose": (cx, hy + 0.25 * r), "left_eye": (cx + 0.38 * r, hy - 0.15 * r),
         "right_eye": (cx - 0.38 * r, hy - 0.15 * r), "left_ear": (cx + 0.95 * r, hy),
         "right_ear": (cx - 0.95 * r, hy)}
  sy, hip_y = 2 * r + 0.06, 2 * r + 0.36
  for side, sign in (("left", 1.0), ("right", -1.0)):
    shoulder = (cx + sign * 0.15, sy)
    a1, a2 = rng.uniform(0.1, 1.7), rng.uniform(-0.4, 1.0)  # arm angles from "straight down", outward
    elbow = (shoulder[0] + sign * 0.17 * np.sin(a1), shoulder[1] + 0.17 * np.cos(a1))
    wrist = (elbow[0] + sign * 0.15 * np.sin(a1 + a2), elbow[1] + 0.15 * np.cos(a1 + a2))
    hip = (cx + sign * 0.08, hip_y)
    l1, l2 = rng.uniform(0.0, 0.35), rng.uniform(-0.3, 0.3)
    knee = (hip[0] + sign * 0.22 * np.sin(l1), hip[1] + 0.22 * np.cos(l1))
    ankle = (knee[0] + sign * 0.2 * np.sin(l1 + l2), knee[1] + 0.2 * np.cos(l1 + l2))
    pts.update({f"{side}_shoulder": shoulder, f"{side}_elbow": elbow, f"{side}_wrist": wrist,
                f"{side}_hip": hip, f"{side}_knee": knee, f"{side}_ankle": ankle})
  return np.array([pts[n] for n in tasks.KEYPOINTS], np.float64)


def _figure_box(points, height, line):
  """Pixel-edge box of a drawn figure: head disc, joint dots and strokes of half-width `line`."""
  r = _HEAD * height
  head = points[0] - [0, 0.25 * r]
  lo = np.minimum(points.min(0) - line, head - r - line)
  hi = np.maximum(points.max(0) + line, head + r + line)
  return tuple(int(v) for v in (np.floor(lo[0]), np.floor(lo[1]), np.ceil(hi[0]) + 1, np.ceil(hi[1]) + 1))


def people_scene(rng, lo, hi):
  """-> ((W, H), [Person]): 1-2 figures side by side, some with legs behind an occluding box."""
  size = _size(rng, lo, hi)
  w, h = size
  n = int(rng.integers(1, 3))
  figures, occluders = [], []
  for k in range(n):
    slot = (k * w // n, (k + 1) * w // n)
    unit = _figure(rng)
    extent = unit.max(0) - unit.min(0) + [2 * _HEAD, 2 * _HEAD]
    height = min(rng.uniform(0.55, 0.9) * h, 0.9 * (slot[1] - slot[0]) / extent[0], 0.9 * h / extent[1])
    line = max(1.0, 0.02 * height)
    pts = unit * height
    lo_xy = np.minimum(pts.min(0), [-_HEAD * height, 0]) - 2 * line
    hi_xy = np.maximum(pts.max(0), [_HEAD * height, 0]) + 2 * line
    shift = [rng.uniform(slot[0] - lo_xy[0], max(slot[0] - lo_xy[0], slot[1] - hi_xy[0])),
             rng.uniform(-lo_xy[1], max(-lo_xy[1], h - hi_xy[1]))]
    pts = pts + shift
    if rng.random() < 0.35:  # an occluder hides the lower legs: those points become v=1 and leave the answer
      occluders.append((int(pts[:, 0].min() - 3 * line), int(pts[13:15, 1].mean()),
                        int(np.ceil(pts[:, 0].max() + 3 * line)), h))
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    figures.append((pts, height, line, color))
  people = []
  for pts, height, line, color in figures:
    hidden = np.zeros(17, bool)
    px = np.floor(pts)  # a point is hidden when the pixel it falls on is covered
    for x1, y1, x2, y2 in occluders:
      hidden |= (px[:, 0] >= x1) & (px[:, 0] < x2) & (px[:, 1] >= y1) & (px[:, 1] < y2)
    vis = np.where(hidden, 1.0, 2.0)
    people.append(Person(_figure_box(pts, height, line), np.concatenate([pts, vis[:, None]], 1), color, height))
  return size, people, occluders


def document_scene(rng, lo, hi):
  """-> ((W, H), [Block]): a portrait page, one column of blocks under a title, exact block boxes."""
  size = _size(rng, lo, hi, aspect=rng.uniform(1.2, 1.45))
  w, h = size
  margin = max(6, int(0.07 * w))
  y = margin
  blocks = [Block("title", (margin + int(rng.integers(0, w // 5)), y, w - margin - int(rng.integers(0, w // 4)),
                            y + max(8, int(0.05 * h))))]
  y = blocks[0].box[3] + max(4, int(0.03 * h))
  while True:
    cls = ("text", "text", "list", "table", "figure")[int(rng.integers(5))]
    height = int(rng.uniform(0.08, 0.22) * h)
    if y + height > h - margin:
      break
    indent = int(rng.integers(0, w // 6)) if cls in ("list", "figure", "table") else 0
    blocks.append(Block(cls, (margin + indent, y, w - margin - (indent if cls != "list" else 0), y + height)))
    y += height + max(4, int(0.025 * h))
  return size, blocks


# --------------------------------------------------------------------------------------------- drawing
def _draw_shape(draw, s: Shape):
  x1, y1, x2, y2 = s.box
  fill = COLORS[s.color]
  if s.shape == "circle":
    draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
  elif s.shape == "square":
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
  else:
    draw.polygon(((x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)), fill=fill)


def _draw_person(draw, p: Person):
  pts = p.keypoints[:, :2]
  color = COLORS[p.color]
  line = max(1.0, 0.02 * p.scale)
  r = _HEAD * p.scale
  head = pts[0] - [0, 0.25 * r]
  for a, b in SKELETON[:12]:  # body strokes; the face is drawn on the head disc
    draw.line([tuple(pts[a - 1]), tuple(pts[b - 1])], fill=color, width=int(round(2 * line)))
  draw.ellipse((head[0] - r, head[1] - r, head[0] + r, head[1] + r), fill=SKIN, outline=color,
               width=max(1, int(line)))
  for i, (x, y) in enumerate(pts):
    d = line if i >= 5 else max(1.0, 0.5 * line)
    draw.ellipse((x - d, y - d, x + d, y + d), fill=color if i >= 5 else (40, 30, 30))


def _draw_block(draw, rng, b: Block):
  x1, y1, x2, y2 = b.box
  ink = (40, 40, 40)
  if b.cls == "title":
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=(30, 30, 60))
  elif b.cls in ("text", "list"):
    # n bars of 0.6 pitch; the pitch is chosen so the last bar ends on y2 and the first bar spans the full
    # width, so the drawn ink fills the block's box exactly
    n = max(2, (y2 - y1) // 9)
    pitch = (y2 - y1) / (n - 0.4)
    for k in range(n):
      top = y1 + int(round(k * pitch))
      bottom = y2 if k == n - 1 else y1 + int(round(k * pitch + 0.6 * pitch))
      start = x1
      if b.cls == "list":
        draw.ellipse((x1, top, x1 + 2, top + 2), fill=ink)
        start = x1 + 6
      end = x2 if k == 0 else int(rng.integers(start + (x2 - start) // 2, x2 + 1))
      draw.rectangle((start, top, end - 1, bottom - 1), fill=(110, 110, 110))
  elif b.cls == "table":
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=ink)
    for gx in np.linspace(x1, x2 - 1, 4)[1:-1]:
      draw.line([(gx, y1), (gx, y2 - 1)], fill=ink)
    for gy in np.linspace(y1, y2 - 1, 5)[1:-1]:
      draw.line([(x1, gy), (x2 - 1, gy)], fill=ink)
  else:
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=(200, 220, 240))
    s = min(x2 - x1, y2 - y1) // 2
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    draw.ellipse((cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2), fill=(90, 140, 90))


def _texture(img, rng):
  """Textured domain: a diagonal brightness ramp (-20..+20) and per-pixel grey noise (+-12) over the drawing."""
  w, h = img.size
  ramp = ((np.arange(w, dtype=np.uint16) * 24 // w).astype(np.uint8)[None, :]
          + (np.arange(h, dtype=np.uint16) * 16 // h).astype(np.uint8)[:, None])
  field = ramp + rng.integers(0, 25, size=(h, w), dtype=np.uint8)  # 0..64, centred on 32 below
  grey = Image.fromarray(field, "L").convert("RGB")
  return ImageChops.add(img, grey, scale=1.0, offset=-32)  # saturating, in C


# --------------------------------------------------------------------------------------------- questions
def _article(name: str) -> str:
  return "an" if name[0] in "aeiou" else "a"


def _joined(pieces) -> str:
  """['a', 'b', 'c'] -> 'a, b and c'."""
  return pieces[0] if len(pieces) == 1 else ", ".join(pieces[:-1]) + " and " + pieces[-1]


def _listing(names) -> str:
  return _joined([f"{_article(n)} {n}" for n in names])


def _grounded_sentence(frame, objects) -> str:
  """'There is a <p>red square</p>[x1,y1,x2,y2] and a ...' naming `objects` in their order (grounded captions)."""
  return "There is " + _joined([f"{_article(o.name)} {tasks.grounded([(o.name, [frame.normalise(o.box)])])}"
                                for o in objects]) + "."


def describe(frame, objects, rng) -> str:
  """A shapes scene in words, every shape with its box as the grounded captions print them, in a random order (the
  order says nothing the image would not: the world's grounded captions go left to right)."""
  return _grounded_sentence(frame, [objects[k] for k in rng.permutation(len(objects))])


def vqa_question(rng, objects):
  """-> (question, answer, question type) about a shapes scene; answers are single words or digits."""
  kinds = ["count"]
  by_shape = {s: [o for o in objects if o.shape == s] for s in SHAPES}
  by_color = {c: [o for o in objects if o.color == c] for c in COLORS}
  if any(len(v) == 1 for v in by_shape.values()):
    kinds.append("color")
  if any(len(v) == 1 for v in by_color.values()):
    kinds.append("shape")
  pairs = [(a, b) for a in objects for b in objects if a is not b and abs(a.centre[0] - b.centre[0]) >= 8]
  if pairs:
    kinds.append("left")
  kind = kinds[int(rng.integers(len(kinds)))]
  if kind == "count":
    s = SHAPES[int(rng.integers(len(SHAPES)))]
    return f"How many {PLURAL[s]} are there?", str(len(by_shape[s])), "how many"
  if kind == "color":
    unique = [s for s, v in by_shape.items() if len(v) == 1]
    s = unique[int(rng.integers(len(unique)))]
    return f"What color is the {s}?", by_shape[s][0].color, "what color is the"
  if kind == "shape":
    unique = [c for c, v in by_color.items() if len(v) == 1]
    c = unique[int(rng.integers(len(unique)))]
    return f"What shape is the {c} object?", by_color[c][0].shape, "what shape is the"
  a, b = pairs[int(rng.integers(len(pairs)))]
  return f"Is the {a.name} to the left of the {b.name}?", "yes" if a.centre[0] < b.centre[0] else "no", "is the"


# --------------------------------------------------------------------------------------------- the world
class World:
  """A seeded source of (image, Record, truth) for every task; pure function of (seed, domain, index, task).

  sizes: (lo, hi) side range in pixels; each image's W and H are drawn from it (documents are portrait).
  max_objects: shapes per shapes scene are 1..max_objects (fewer make an easier world).
  object_sides: (lo, hi) range of a shape's side as a fraction of the image's shorter side (larger shapes cover
  more patches and tolerate more error in a box; a shape that finds no room in the scene is left out).
  """

  def __init__(self, seed: int = 0, domain: str = "flat", sizes: tuple[int, int] = (160, 288),
               max_objects: int = 5, object_sides: tuple[float, float] = OBJECT_SIDES):
    if domain not in DOMAINS:
      raise SphinxError(f"shapes world: unknown domain {domain!r}; use one of {DOMAINS}")
    if not 64 <= sizes[0] <= sizes[1]:
      raise SphinxError(f"shapes world: sizes={sizes} must satisfy 64 <= lo <= hi")
    if not 1 <= max_objects <= len(SHAPES) * len(COLORS):
      raise SphinxError(f"shapes world: max_objects={max_objects}; use 1..{len(SHAPES) * len(COLORS)}")
    if not 0 < object_sides[0] <= object_sides[1] <= 1:
      raise SphinxError(f"shapes world: object_sides={tuple(object_sides)} must satisfy 0 < lo <= hi <= 1")
    self.seed, self.domain, self.sizes, self.max_objects = int(seed), domain, tuple(sizes), int(max_objects)
    self.object_sides = tuple(float(v) for v in object_sides)

  def _rng(self, index, *stream):
    return np.random.default_rng([self.seed, index, *stream])

  def shapes_of(self, index: int):
    """-> ((W, H), shapes) of the shapes scene at `index`, without drawing it (`scene` draws the same one)."""
    return shapes_scene(self._rng(index, _KIND["shapes"]), *self.sizes, self.max_objects, self.object_sides)

  def scene(self, index: int, kind: str):
    """-> (PIL.Image, (W, H), objects) for one scene; the same for every task asked about it."""
    rng = self._rng(index, _KIND[kind])
    style = self._rng(index, _KIND[kind], 10 + DOMAINS.index(self.domain))
    if kind == "shapes":
      size, objects = self.shapes_of(index)
      img = Image.new("RGB", size, BACKGROUND)
      draw = ImageDraw.Draw(img)
      for o in objects:
        _draw_shape(draw, o)
    elif kind == "people":
      size, objects, occluders = people_scene(rng, *self.sizes)
      img = Image.new("RGB", size, BACKGROUND)
      draw = ImageDraw.Draw(img)
      for p in objects:
        _draw_person(draw, p)
      for occ in occluders:
        draw.rectangle((occ[0], occ[1], occ[2] - 1, occ[3] - 1), fill=OCCLUDER)
    else:
      size, objects = document_scene(rng, *self.sizes)
      img = Image.new("RGB", size, PAPER)
      draw = ImageDraw.Draw(img)
      for b in objects:
        _draw_block(draw, rng, b)
    if self.domain == "textured":
      img = _texture(img, style)
    return img, size, objects

  def sample(self, index: int, task: str, turns: int = 1, as_text: bool = False):
    """-> (PIL.Image, Record, truth). truth always has "size" (W, H) and "objects" (the scene's Shape /
    Person / Block list) plus, per task: vqa: question, answer, question_type; conversation: answers;
    rec, reg: expression, box; grounded_caption: phrases [(phrase, box)]; detection: class, boxes;
    pose: box, keypoints float[17, 3]; layout: blocks [(class, box)]. Boxes and points in original pixels.

    turns > 1: up to that many distinct questions of the task about the scene in one multi-turn conversation
    (the way LLaVA-style training data group the questions of an image, so one image forward serves several
    answers); the first turn and `truth` are those of turns=1, truth["turns"] lists every turn's fields. Tasks
    with one possible question per scene give fewer turns.

    as_text: the scene in words instead of an image (shapes-scene tasks only): the Record has no image and its
    first question starts with `describe`'s sentence; the image is None. The text-only pre-training of a decoder
    that later reads the image (configs/demo.py `llm`), as SPHINX starts from a language model.
    """
    if task not in WORLD_TASKS:
      raise SphinxError(f"shapes world: no task {task!r}; use one of {WORLD_TASKS}")
    if turns < 1:
      raise SphinxError(f"shapes world: turns={turns}; use 1 or more")
    if as_text and kind_of(task) != "shapes":
      raise SphinxError(f"shapes world: as_text describes shapes scenes only; task {task!r} has {kind_of(task)} "
                        "scenes")
    img, size, objects = (None, *self.shapes_of(index)) if as_text else self.scene(index, kind_of(task))
    frame = tasks.Frame(*size)
    rng = self._rng(index, 100 + WORLD_TASKS.index(task))
    qa, truth = _ask(task, rng, frame, objects)
    if turns > 1:
      qa, truth["turns"] = _more_turns(task, rng, frame, objects, qa, truth, turns)
    truth.update(size=size, objects=objects)
    if as_text:
      qa = [describe(frame, objects, self._rng(index, 200)) + "\n" + qa[0], *qa[1:]]
    turns = tuple({"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(qa))
    record = Record(id=f"shapes/{self.seed}/{self.domain}/{task}/{index}" + ("/text" if as_text else ""),
                    task=task, conversations=turns, image=None if as_text else _bmp(img))
    return img, record, truth


class WorldSource:
  """The world as a random-access record source (len + getitem, what a Grain MapDataset wraps).

  Item i asks tasks[i % len(tasks)] about scene i // len(tasks) (`turns` questions, World.sample; `as_text`: the
  scene described in words, no image); `length` items in all.
  """

  def __init__(self, world: World, task_names: tuple = WORLD_TASKS, length: int = 10_000, turns: int = 1,
               as_text: bool = False):
    unknown = sorted(set(task_names) - set(WORLD_TASKS))
    if unknown or not task_names or length < 1 or turns < 1:
      raise SphinxError(f"shapes source: tasks {list(task_names)} / length {length} / turns {turns}: use tasks "
                        f"from {WORLD_TASKS}, length >= 1 and turns >= 1")
    self.world, self.tasks, self.length, self.turns = world, tuple(task_names), int(length), int(turns)
    self.as_text = bool(as_text)

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> Record:
    if not 0 <= index < self.length:
      raise IndexError(f"shapes source: index {index} outside [0, {self.length})")
    n = len(self.tasks)
    return self.world.sample(index // n, self.tasks[index % n], self.turns, self.as_text)[1]


def _more_turns(task, rng, frame, objects, qa, truth, turns):
  """Appends distinct further questions of `task` (a few draws per wanted turn) -> (qa, per-turn truths)."""
  asked, truths = {qa[0]}, [dict(truth)]
  for _ in range(4 * turns):
    if len(truths) == turns:
      break
    more, more_truth = _ask(task, rng, frame, objects)
    if more[0] not in asked:
      asked.add(more[0])
      qa, truths = qa + more, truths + [more_truth]
  return qa, truths


def _ask(task, rng, frame, objects):
  """-> ([human, gpt, human, gpt, ...] texts, truth fields) for one task about a scene."""
  if task == "vqa":
    q, a, qtype = vqa_question(rng, objects)
    return [tasks.short_answer_prompt(q), a], {"question": q, "answer": a, "question_type": qtype}
  if task == "conversation":
    names = [o.name for o in sorted(objects, key=lambda o: o.centre[0])]
    first = f"The image shows {_listing(names)}, from left to right."
    q, a, _ = vqa_question(rng, objects)
    return ["What is in the image?", first, q, a.capitalize() + "."], {"answers": [first, a]}
  if task in ("rec", "reg"):
    o = objects[int(rng.integers(len(objects)))]
    box_text = tasks.encode(frame, [o.box])
    if task == "rec":
      return [tasks.rec_prompt(o.name), box_text], {"expression": o.name, "box": o.box}
    return [tasks.reg_prompt(box_text), o.name], {"expression": o.name, "box": o.box}
  if task == "grounded_caption":
    ordered = sorted(objects, key=lambda o: o.centre[0])
    return [tasks.GROUNDED_CAPTION_PROMPT, _grounded_sentence(frame, ordered)], \
        {"phrases": [(o.name, o.box) for o in ordered]}
  if task == "detection":
    cls = SHAPES[int(rng.integers(len(SHAPES)))]
    boxes = [o.box for o in sorted(objects, key=lambda o: o.centre[0]) if o.shape == cls]
    answer = tasks.grounded([(cls, [frame.normalise(b) for b in boxes])]) if boxes else tasks.NO_OBJECT
    return [tasks.detection_prompt(PLURAL[cls]), answer], {"class": cls, "boxes": boxes}
  if task == "pose":
    p = objects[int(rng.integers(len(objects)))]
    visible = {n: frame.normalise(p.keypoints[i, :2]) for i, n in enumerate(tasks.KEYPOINTS)
               if p.keypoints[i, 2] == 2}
    return [tasks.pose_prompt(frame.normalise(p.box)), tasks.pose_answer(visible)], \
        {"box": p.box, "keypoints": p.keypoints}
  blocks = [(b.cls, b.box) for b in objects]
  answer = tasks.layout_answer([(c, frame.normalise(b)) for c, b in blocks])
  return [tasks.LAYOUT_PROMPT, answer], {"blocks": blocks}


def _bmp(img) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="BMP")  # lossless like PNG, 25x faster to write (PNG filtering dominated sample time)
  return buf.getvalue()


# --------------------------------------------------------------------------------------------- writers
def _fresh_dir(out_dir, write):
  """Runs write(tmp) in a temporary sibling of out_dir, then renames it: nothing partial is left behind."""
  out_dir = os.fspath(out_dir)
  if os.path.exists(out_dir):
    raise SphinxError(f"{out_dir}: already exists; the shapes writers create a new folder, pick another path")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".shapes-", dir=parent)
  try:
    os.makedirs(os.path.join(tmp, "images"))
    write(tmp)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def _dump(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f)


def write_accessory(world: World, items, out_dir, fmt: str = "jsonl"):
  """LLaMA2-Accessory conversation data: out_dir/conversations.jsonl (or .json, a list) + out_dir/images/.

  items: iterable of (index, task). Each entry: {"id", "task", "image": "images/<task>_<index>.png",
  "conversations": [{"from": "human"|"gpt", "value"}...]}; image paths are relative to out_dir (the
  Accessory data YAML's `root`). Returns out_dir.
  """
  if fmt not in ("jsonl", "json"):
    raise SphinxError(f"write_accessory: fmt={fmt!r}; use 'jsonl' or 'json'")

  def write(tmp):
    entries = []
    for index, task in items:
      img, record, _ = world.sample(index, task)
      name = f"images/{task}_{index:06d}.png"
      img.save(os.path.join(tmp, name))
      entries.append({"id": record.id, "task": task, "image": name, "conversations": list(record.conversations)})
    with open(os.path.join(tmp, f"conversations.{fmt}"), "w") as f:
      if fmt == "json":
        json.dump(entries, f)
      else:
        f.writelines(json.dumps(e) + "\n" for e in entries)

  return _fresh_dir(out_dir, write)


def _xywh(box):
  return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _coco_image(image_id, name, size):
  return {"id": image_id, "file_name": name, "width": size[0], "height": size[1]}


def write_coco(world: World, count: int, out_dir):
  """COCO-format sets of `count` scenes each (scene index i has image_id i), images under out_dir/images/:

  - instances.json: shapes scenes `shapes_<i>.png`; categories circle 1, square 2, triangle 3; every
    annotation has bbox [x, y, w, h], area, iscrowd 0 and our extra field "color".
  - refs.json (refcoco-like, JSON instead of the original pickle): a list of {"ref_id", "ann_id",
    "image_id", "category_id", "split": "train", "sentences": [{"sent", "raw", "tokens", "sent_id"}],
    "sent_ids"}, one per shape ("red circle"); ann_id points into instances.json. Serves REC and REG.
  - person_keypoints.json: people scenes `people_<i>.png`; category person 1 with COCO's keypoint names and
    skeleton; annotations carry keypoints [x, y, v] * 17 (v 2 visible, 1 occluded), num_keypoints (v > 0).
  - layout.json: document pages `document_<i>.png`, PubLayNet categories text 1, title 2, list 3, table 4,
    figure 5.
  Returns out_dir.
  """
  def write(tmp):
    sets = {"instances": ([], [], [{"id": k + 1, "name": s, "supercategory": "shape"}
                                   for k, s in enumerate(SHAPES)]),
            "person_keypoints": ([], [], [{"id": 1, "name": "person", "supercategory": "person",
                                           "keypoints": list(tasks.KEYPOINTS),
                                           "skeleton": [list(e) for e in SKELETON]}]),
            "layout": ([], [], [{"id": i, "name": c, "supercategory": ""} for c, i in PUBLAYNET_IDS.items()])}
    refs = []
    for i in range(count):
      for kind, key in (("shapes", "instances"), ("people", "person_keypoints"), ("document", "layout")):
        img, size, objects = world.scene(i, kind)
        name = f"{kind}_{i:06d}.png"
        img.save(os.path.join(tmp, "images", name))
        images, anns, _ = sets[key]
        images.append(_coco_image(i, name, size))
        for o in objects:
          ann = {"id": len(anns) + 1, "image_id": i, "bbox": _xywh(o.box), "iscrowd": 0,
                 "area": (o.box[2] - o.box[0]) * (o.box[3] - o.box[1])}
          if kind == "shapes":
            ann.update(category_id=SHAPES.index(o.shape) + 1, color=o.color)
            refs.append({"ref_id": len(refs), "ann_id": ann["id"], "image_id": i, "category_id": ann["category_id"],
                         "split": "train", "sent_ids": [len(refs)],
                         "sentences": [{"sent": o.name, "raw": o.name, "tokens": o.name.split(),
                                        "sent_id": len(refs)}]})
          elif kind == "people":
            ann.update(category_id=1, keypoints=[v for x, y, vis in o.keypoints
                                                 for v in (round(float(x), 2), round(float(y), 2), int(vis))],
                       num_keypoints=int((o.keypoints[:, 2] > 0).sum()))
          else:
            ann.update(category_id=PUBLAYNET_IDS[o.cls])
          anns.append(ann)
    for key, (images, anns, cats) in sets.items():
      _dump(os.path.join(tmp, f"{key}.json"), {"images": images, "annotations": anns, "categories": cats})
    _dump(os.path.join(tmp, "refs.json"), refs)

  return _fresh_dir(out_dir, write)


def write_vqav2(world: World, count: int, out_dir):
  """VQAv2-format files for the vqa task on scenes 0..count-1 (image_id = question_id = scene index):

  out_dir/questions.json {"task_type": "Open-Ended", "data_type": "shapes", "data_subtype": VQA_SUBTYPE,
  "questions": [{"image_id", "question", "question_id"}]} (the raw question, no answer-format suffix);
  out_dir/annotations.json {"annotations": [{"question_id", "image_id", "question_type", "answer_type",
  "multiple_choice_answer", "answers": 10 x {"answer", "answer_confidence": "yes", "answer_id"}}]};
  images named as COCO's: out_dir/images/COCO_<data_subtype>_<image_id:012d>.jpg (JPEG quality 95, so
  answers stay exact but pixels do not). Returns out_dir.
  """
  def write(tmp):
    questions, annotations = [], []
    for i in range(count):
      img, _, truth = world.sample(i, "vqa")
      img.save(os.path.join(tmp, "images", f"COCO_{VQA_SUBTYPE}_{i:012d}.jpg"), quality=95)
      questions.append({"image_id": i, "question": truth["question"], "question_id": i})
      answer = truth["answer"]
      kind = "yes/no" if answer in ("yes", "no") else "number" if answer.isdigit() else "other"
      annotations.append({"question_id": i, "image_id": i, "question_type": truth["question_type"],
                          "answer_type": kind, "multiple_choice_answer": answer,
                          "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                      for k in range(10)]})
    _dump(os.path.join(tmp, "questions.json"), {"task_type": "Open-Ended", "data_type": "shapes",
                                                 "data_subtype": VQA_SUBTYPE, "questions": questions})
    _dump(os.path.join(tmp, "annotations.json"), {"data_type": "shapes", "data_subtype": VQA_SUBTYPE,
                                                   "annotations": annotations})

  return _fresh_dir(out_dir, write)
