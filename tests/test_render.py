"""render: marks parsed from SPHINX answers land on the right pixels of wide and tall images.

Expected pixel positions are worked out by hand in each test from the padded-square rule of SPHINX.md §7.
"""
import numpy as np
from PIL import Image

from sphinx_jax.inference import render

WHITE, RED, BLUE, GREEN = (255, 255, 255), (255, 0, 0), (0, 0, 255), (0, 128, 0)


def pixels(image):
  return np.asarray(image.convert("RGB"))


def at(arr, x, y):
  return tuple(int(v) for v in arr[y, x])


def test_parse_grounded_bare_and_multi_box():
  answer = ("There is <p>a dog</p>[0.10,0.20,0.50,0.60;0.55,0.20,0.90,0.70] near [0.25,0.75]. "
            "Counted [1, 2] of them.")
  marks = render.parse_marks(answer)
  assert marks == [render.Mark("a dog", (0.10, 0.20, 0.50, 0.60)), render.Mark("a dog", (0.55, 0.20, 0.90, 0.70)),
                   render.Mark("", (0.25, 0.75))]


def test_box_on_wide_image():
  image = Image.new("RGB", (300, 100), WHITE)
  arr = pixels(render.render_answer(image, "[0.20,0.40,0.60,0.55]"))
  # box (60, 20)-(180, 65), 2 px outline drawn inward
  for x, y in [(120, 20), (120, 21), (60, 40), (61, 40), (180, 40), (179, 40), (120, 65), (120, 64)]:
    assert at(arr, x, y) == RED, (x, y)
  for x, y in [(120, 19), (120, 22), (59, 40), (62, 40), (181, 40), (120, 66), (120, 40)]:
    assert at(arr, x, y) == WHITE, (x, y)
  assert arr.shape == (100, 300, 3)


def test_inverted_box_is_drawn_not_fatal():
  """A malformed prediction [x2,y2,x1,y1] (seen from a half-trained model) draws the same box as the ordered one."""
  image = Image.new("RGB", (300, 100), WHITE)
  inverted = pixels(render.render_answer(image, "[0.60,0.55,0.20,0.40]"))
  np.testing.assert_array_equal(inverted, pixels(render.render_answer(image, "[0.20,0.40,0.60,0.55]")))


def test_points_and_skeleton_on_tall_image():
  image = Image.new("RGB", (100, 300), WHITE)
  answer = "<p>left shoulder</p>[0.40,0.30] <p>right shoulder</p>[0.60,0.30] [0.50,0.90,0.55,0.95]"
  arr = pixels(render.render_answer(image, answer))
  # x offset 100 in the 300 square: left shoulder at (20, 90), right shoulder at (80, 90)
  assert at(arr, 20, 90) == RED and at(arr, 16, 90) == RED and at(arr, 20, 86) == RED
  assert at(arr, 80, 90) == BLUE
  assert at(arr, 20, 97) == WHITE  # disc radius 5 ends at y 95
  assert at(arr, 50, 90) == GREEN  # limb (6, 7) joins the shoulders
  # the box: (50, 270)-(65, 285), third colour of the cycle
  assert at(arr, 57, 270) == GREEN and at(arr, 50, 278) == GREEN and at(arr, 57, 278) == WHITE


def test_no_marks_leaves_the_image_unchanged():
  image = Image.new("RGB", (64, 48), (10, 20, 30))
  out = render.render_answer(image, "Just a sentence with [3, 4] integers.")
  np.testing.assert_array_equal(pixels(out), pixels(image))


def test_label_is_written_inside_the_box_corner():
  image = Image.new("RGB", (300, 100), WHITE)
  bare = pixels(render.render_answer(image, "[0.20,0.40,0.60,0.55]"))
  labelled = pixels(render.render_answer(image, "<p>cat</p>[0.20,0.40,0.60,0.55]"))
  corner = (slice(23, 40), slice(63, 100))  # just inside the top-left corner (60, 20)
  assert (bare[corner] == WHITE).all()
  text = labelled[corner]
  r, g, b = (text[..., i].astype(int) for i in range(3))
  assert ((r - g > 100) & (g == b)).sum() > 10  # antialiased red ink
  assert (g == b).all() and (r >= g).all()      # and no ink of another colour
