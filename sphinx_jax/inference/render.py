"""Draws the boxes, points and labels of a SPHINX answer onto the user's image.

Mirrors `extract_and_color` and `draw_box_mask_on_image` of LLaMA2-Accessory's
`accessory/demos/multi_turn_mm_box.py` (without the SAM masks). Answer format (SPHINX.md §7): boxes
`[x1,y1,x2,y2]` and points `[x,y]`, decimals normalised to [0, 1] on the padded square (side max(W, H),
image centred), several per bracket separated by `;`; a grounded phrase is `<p>phrase</p>[...]`. A point
whose phrase names a COCO keypoint (`left shoulder`) joins the COCO-17 skeleton.

In: an answer string and a PIL image of any aspect. Out: a copy of the image with the marks drawn.
"""
from __future__ import annotations

import dataclasses
import re

from PIL import Image, ImageDraw

from sphinx_jax.data import tasks

COLORS = ("red", "blue", "green", "purple", "orange")  # the demo's cycle
# COCO-17 limbs, 1-based as in the COCO annotation file and the demo.
SKELETON = ((16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9), (8, 10),
            (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7))
SKELETON_COLOR = "green"
BOX_WIDTH, POINT_RADIUS, LIMB_WIDTH = 2, 5, 3

_GROUNDED = re.compile(r"<p>(.*?)</p>\s*(\[[\d.,;\s]*\])")
_BRACKET = re.compile(r"\[[\d.,;\s]*\]")


@dataclasses.dataclass(frozen=True)
class Mark:
  """One located thing: `coords` has 4 numbers (box) or 2 (point), normalised to the padded square."""
  label: str
  coords: tuple[float, ...]


def _coords(bracket: str) -> list[tuple[float, ...]]:
  """'[0.10,0.20;0.30,0.40,0.50,0.60]' -> [(0.1, 0.2), (0.3, 0.4, 0.5, 0.6)]; decimals only (as the demo, so
  '[1, 2]' in prose is no mark); groups of other lengths are dropped."""
  return [tuple(g) for g in tasks.parse_group(bracket.strip("[]")) if len(g) in (2, 4)]


def parse_marks(answer: str) -> list[Mark]:
  """All marks of an answer in reading order; grounded phrases give their label, bare brackets ''.

  Example: 'a <p>dog</p>[0.10,0.20,0.50,0.60] and [0.70,0.80]' -> [Mark('dog', (0.1, 0.2, 0.5, 0.6)),
  Mark('', (0.7, 0.8))].
  """
  found = []
  grounded_spans = []
  for match in _GROUNDED.finditer(answer):
    grounded_spans.append(match.span(2))
    found += [(match.start(2), Mark(match.group(1).strip(), c)) for c in _coords(match.group(2))]
  for match in _BRACKET.finditer(answer):
    if match.span() not in grounded_spans:
      found += [(match.start(), Mark("", c)) for c in _coords(match.group())]
  return [mark for _, mark in sorted(found, key=lambda item: item[0])]


def draw_marks(image: Image.Image, marks: list[Mark]) -> Image.Image:
  """A copy of `image` with skeleton limbs, then boxes (outline), points (filled discs) and labels on top."""
  out = image.convert("RGB")
  canvas = ImageDraw.Draw(out)
  frame = tasks.Frame(image.width, image.height)  # undoes PadToSquare's centring offset
  placed = [tuple(frame.to_pixels(mark.coords)) for mark in marks]
  keypoints = {m.label.replace(" ", "_"): xy for m, xy in zip(marks, placed) if len(xy) == 2}
  for a, b in SKELETON:
    ends = keypoints.get(tasks.KEYPOINTS[a - 1]), keypoints.get(tasks.KEYPOINTS[b - 1])
    if None not in ends:
      canvas.line(ends, fill=SKELETON_COLOR, width=LIMB_WIDTH)
  for i, (mark, xy) in enumerate(zip(marks, placed)):
    color = COLORS[i % len(COLORS)]
    if len(xy) == 4:  # an inverted box ([x2, y2, x1, y1], a malformed answer) is drawn over the same span
      x1, y1, x2, y2 = xy
      canvas.rectangle((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), outline=color, width=BOX_WIDTH)
    else:
      x, y = xy
      canvas.ellipse((x - POINT_RADIUS, y - POINT_RADIUS, x + POINT_RADIUS, y + POINT_RADIUS), fill=color)
    if mark.label:
      canvas.text((xy[0] + 3, xy[1] + 3), mark.label, fill=color)
  return out


def render_answer(image: Image.Image, answer: str) -> Image.Image:
  """`draw_marks(image, parse_marks(answer))`: what `sphinx-jax generate` and the notebook show."""
  return draw_marks(image, parse_marks(answer))
