"""Task prompts (literal strings of the original), the box/point codec on the padded square, the answer
parsers, and every world task's answer parsing back to its ground truth on wide and tall images."""
import numpy as np
import pytest

from sphinx_jax.data import shapes, tasks
from sphinx_jax.data.tasks import Frame
from sphinx_jax.errors import SphinxError


def test_prompts_are_the_originals():
  assert tasks.short_answer_prompt("What is it?") == "What is it?\nAnswer the question using a single word or phrase."
  assert tasks.short_answer_prompt("Q?", vizwiz=True) == (
      "Q? When the provided information is insufficient, respond with 'Unanswerable'.\n"
      "Answer the question using a single word or phrase.")
  assert tasks.multiple_choice_prompt("Which?", ["frog", "whale"], context="Bio.") == (
      'Context:\nBio.\nQuestion:\nWhich?\nChoices:\nA. frog\nB. whale\n'
      'Answer with the option"s letter from the given choices directly.')
  assert tasks.multiple_choice_prompt("Which?", ["x"]).startswith("Question:\nWhich?\nChoices:\nA. x\n")
  with pytest.raises(SphinxError, match="11 choices"):
    tasks.multiple_choice_prompt("Which?", list("abcdefghijk"))
  assert tasks.SCIENCEQA_PREFILL == " The answer is"
  assert tasks.rec_prompt("blue backpack") == (
      "Please provide the bounding box coordinate of the region this sentence describes: blue backpack.")
  assert tasks.GROUNDED_CAPTION_PROMPT == (
      "Describe the image concisely. Include the bounding box for each mentioned object.")
  assert tasks.detection_prompt("people") == "Detect all people shown in the image."
  assert tasks.pose_prompt([0.1, 0.2, 0.3, 0.4]) == (
      "Detect the key points of the person in the region [0.10, 0.20, 0.30, 0.40].")
  assert tasks.TEXT_DETECTION_PROMPT == "Please detect all texts and provide their bounding box coordinate."
  assert tasks.vsr_prompt("The cat is on the mat") == (
      'Is the following statement "The cat is on the mat" true or false?')
  assert tasks.reg_prompt("[0.10,0.20,0.30,0.40]") == (
      "Please provide a short description for this region: [0.10,0.20,0.30,0.40].")


@pytest.mark.parametrize("size, offset", [((400, 200), (0, 100)), ((200, 401), (100, 0)), ((300, 300), (0, 0))])
def test_frame_padding(size, offset):
  frame = Frame(*size)
  assert frame.side == max(size) and frame.offset == offset
  box = [10, 20, 150, 180]
  norm = frame.normalise(box)
  side = max(size)
  assert norm == pytest.approx([(10 + offset[0]) / side, (20 + offset[1]) / side,
                                (150 + offset[0]) / side, (180 + offset[1]) / side])
  assert frame.to_pixels(norm) == pytest.approx(box)


def test_text_format():
  frame = Frame(640, 480)  # side 640, image pushed down by 80
  assert tasks.encode(frame, [[166.4, 67.2, 332.8, 444.8]]) == "[0.26,0.23,0.52,0.82]"
  assert tasks.encode(frame, [[0, 0, 64, 64], [320, 160, 640, 480]]) == "[0.00,0.12,0.10,0.23;0.50,0.38,1.00,0.88]"
  assert tasks.encode(frame, [[64, 0]]) == "[0.10,0.12]"
  assert tasks.format_coords([-0.2, 1.3]) == "0.00,1.00"


def test_parsers():
  text = "There is a <p>red circle</p>[0.01,0.41,0.14,0.54] and <p>two cats</p> [0.10,0.20,0.30,0.40;0.5,0.5,0.6,0.7]."
  assert tasks.phrases(text) == [("red circle", [[0.01, 0.41, 0.14, 0.54]]),
                                 ("two cats", [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.7]])]
  assert tasks.all_boxes(text) == [[0.01, 0.41, 0.14, 0.54], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.7]]
  # the demo's rule: numbers without a decimal point are not coordinates
  assert tasks.parse_group("1,0.50") == [[0.5]]
  # REC: only the first bracket, and only if it holds four numbers
  assert tasks.first_box("[0.10,0.20,0.30,0.40] and [0.5,0.5,0.6,0.7]") == [0.1, 0.2, 0.3, 0.4]
  assert tasks.first_box("[0.10,0.20,0.30] then [0.5,0.5,0.6,0.7]") is None
  assert tasks.first_box("0.10,0.20,0.30,0.40]") == [0.1, 0.2, 0.3, 0.4]
  assert tasks.first_box("no box") is None
  assert tasks.short_answer(" yes\n### Human: next") == "yes"
  pose = "<p>nose</p>[0.41,0.22] <p>left eye</p>[0.43,0.20] <p>tail</p>[0.1,0.1] <p>left wrist</p>[0.1,0.1,0.2,0.2]"
  assert tasks.keypoints(pose) == {"nose": [0.41, 0.22], "left_eye": [0.43, 0.2]}
  layout = "<p>title</p>[0.1,0.1,0.9,0.2]<p>text</p>[0.1,0.3,0.9,0.5;0.1,0.6,0.9,0.8]<p>logo</p>[0.1,0.1,0.2,0.2]"
  assert tasks.layout_blocks(layout) == [("title", [0.1, 0.1, 0.9, 0.2]), ("text", [0.1, 0.3, 0.9, 0.5]),
                                         ("text", [0.1, 0.6, 0.9, 0.8])]


def test_answer_builders_order():
  assert tasks.layout_answer([("figure", [0.1, 0.5, 0.9, 0.6]), ("text", [0.1, 0.3, 0.9, 0.4]),
                              ("title", [0.1, 0.1, 0.9, 0.2]), ("text", [0.1, 0.2, 0.9, 0.25])]) == (
      "<p>title</p>[0.10,0.10,0.90,0.20]<p>text</p>[0.10,0.20,0.90,0.25;0.10,0.30,0.90,0.40]"
      "<p>figure</p>[0.10,0.50,0.90,0.60]")
  assert tasks.pose_answer({"left_hip": [0.5, 0.6], "nose": [0.1, 0.2]}) == (
      "<p>nose</p>[0.10,0.20] <p>left hip</p>[0.50,0.60]")


def test_iou():
  assert tasks.iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
  assert tasks.iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
  assert tasks.iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
  assert tasks.iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def _find(world, task, wide):
  """First index whose image is wide (W > H) or tall (H > W)."""
  for i in range(50):
    img, record, truth = world.sample(i, task)
    w, h = truth["size"]
    if (w > h) if wide else (h > w):
      return img, record, truth
  raise AssertionError(f"no {'wide' if wide else 'tall'} image for {task}")


def close(pixels, expected, side):
  """Within the two-decimal rounding, mapped back to pixels of the original image."""
  np.testing.assert_allclose(np.asarray(pixels, float), np.asarray(expected, float), rtol=0,
                             atol=0.005 * side + 1e-9)


@pytest.mark.parametrize("wide", [True, False], ids=["wide", "tall"])
def test_world_answers_parse_back(wide):
  world = shapes.World(seed=11)
  for task in shapes.WORLD_TASKS:
    if task == "layout" and wide:
      continue  # document pages are always portrait
    img, record, truth = _find(world, task, wide)
    frame = Frame(*truth["size"])
    prompt, answer = record.conversations[0]["value"], record.conversations[-1]["value"]
    side = frame.side
    if task == "vqa":
      assert prompt == tasks.short_answer_prompt(truth["question"])
      assert tasks.short_answer(answer) == truth["answer"]
    elif task == "rec":
      assert prompt == tasks.rec_prompt(truth["expression"])
      close(frame.to_pixels(tasks.first_box(answer)), truth["box"], side)
    elif task == "reg":
      close(frame.to_pixels(tasks.first_box(prompt)), truth["box"], side)
      assert answer == truth["expression"]
    elif task == "grounded_caption":
      parsed = tasks.phrases(answer)
      assert [p for p, _ in parsed] == [p for p, _ in truth["phrases"]]
      for (_, boxes), (_, box) in zip(parsed, truth["phrases"]):
        close(frame.to_pixels(boxes[0]), box, side)
    elif task == "detection":
      assert prompt == tasks.detection_prompt(shapes.PLURAL[truth["class"]])
      parsed = [frame.to_pixels(b) for b in tasks.all_boxes(answer)]
      assert len(parsed) == len(truth["boxes"])
      if parsed:
        close(parsed, truth["boxes"], side)
      else:
        assert answer == tasks.NO_OBJECT
    elif task == "pose":
      close(frame.to_pixels(tasks.all_boxes(prompt.replace(", ", ","))[0]), truth["box"], side)
      points = tasks.keypoints(answer)
      visible = [n for n, v in zip(tasks.KEYPOINTS, truth["keypoints"][:, 2]) if v == 2]
      assert list(points) == visible
      for n in visible:
        close(frame.to_pixels(points[n]), truth["keypoints"][tasks.KEYPOINTS.index(n), :2], side)
    elif task == "layout":
      parsed = tasks.layout_blocks(answer)
      expected = sorted(truth["blocks"], key=lambda cb: (tasks.LAYOUT_CLASSES.index(cb[0]), cb[1][1], cb[1][0]))
      assert [c for c, _ in parsed] == [c for c, _ in expected]
      close([frame.to_pixels(b) for _, b in parsed], [b for _, b in expected], side)
    elif task == "conversation":
      assert len(record.conversations) == 4 and record.conversations[1]["value"] == truth["answers"][0]


def test_invisible_keypoints_are_omitted():
  world = shapes.World(seed=11)
  for i in range(60):
    _, record, truth = world.sample(i, "pose")
    hidden = [n for n, v in zip(tasks.KEYPOINTS, truth["keypoints"][:, 2]) if v == 1]
    if hidden:
      assert not set(hidden) & set(tasks.keypoints(record.conversations[1]["value"]))
      return
  raise AssertionError("no occluded person in 60 scenes")
