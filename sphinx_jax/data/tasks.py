"""SPHINX's task prompts, the box/point text codec, answer parsers and IoU.

Mirrors the prompts of `accessory/eval_mm/annotations/annotation_config.json` (short answer, VizWiz, REC,
ScienceQA pre-fill), the multiple-choice questions of its annotation files (`option"s` sic), the task menu of
`accessory/demos/multi_turn_mm_box.py` (grounded caption, detection, keypoints, text detection) and its
box parser (only numbers with a decimal point), and the REC scoring of `accessory/eval_mm/evaluate.py`.

Coordinates: pixel boxes [x1, y1, x2, y2] of the ORIGINAL image (W x H) map to the padded square of side
max(W, H) in which the image sits at offset ((side - W) // 2, (side - H) // 2), then are divided by the side:
text `[0.26,0.23,0.52,0.82]`, two decimals, no spaces; several boxes of one phrase `[b1;b2]`; a point `[x,y]`.

Ours (not in the original, which does not publish these templates):
- REG prompt "Please provide a short description for this region: [box]." (the wording LLaVA-1.5 trains on).
- Detection answer `<p>circle</p>[b1;b2]`, or "None." when there is none.
- Layout prompt LAYOUT_PROMPT; answer `<p>title</p>[b]<p>text</p>[b1;b2]...`, classes in LAYOUT_CLASSES order,
  boxes top to bottom, absent classes omitted.
- Pose answer `<p>nose</p>[0.41,0.22] <p>left eye</p>[0.43,0.20] ...`: COCO-17 order, names with spaces
  (the original demo turns them back into `left_eye` to draw the skeleton), invisible points omitted.
"""
from __future__ import annotations

import dataclasses
import re

from sphinx_jax.data.conversation import cut_reply
from sphinx_jax.errors import SphinxError

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
VIZWIZ = " When the provided information is insufficient, respond with 'Unanswerable'."
MULTIPLE_CHOICE = 'Answer with the option"s letter from the given choices directly.'
SCIENCEQA_PREFILL = " The answer is"
GROUNDED_CAPTION_PROMPT = "Describe the image concisely. Include the bounding box for each mentioned object."
TEXT_DETECTION_PROMPT = "Please detect all texts and provide their bounding box coordinate."
LAYOUT_PROMPT = "Detect the layout of this document page. Give each block's type and bounding box."
NO_OBJECT = "None."
LETTERS = "ABCDEFGHIJ"
LAYOUT_CLASSES = ("title", "text", "list", "table", "figure")  # PubLayNet's categories, in reading order
KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
             "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
             "right_knee", "left_ankle", "right_ankle")  # COCO-17 order

_BRACKET = re.compile(r"\[([\d.,;\s]*)\]")
_PHRASE = re.compile(r"<p>(.*?)</p>\s*\[([\d.,;\s]*)\]")
_DECIMAL = re.compile(r"\d+\.\d+")


# ----------------------------------------------------------------------------------------------- prompts
def short_answer_prompt(question: str, vizwiz: bool = False) -> str:
  return question + (VIZWIZ if vizwiz else "") + SHORT_ANSWER


def multiple_choice_prompt(question: str, choices, context: str | None = None) -> str:
  r"""'Context:\n…\nQuestion:\n…\nChoices:\nA. …\nB. …\nAnswer with the option"s letter…' (no context: no
  Context block, as in the MMMU/Q-Bench files)."""
  if not 0 < len(choices) <= len(LETTERS):
    raise SphinxError(f"multiple choice: {len(choices)} choices; between 1 and {len(LETTERS)} are supported")
  lines = ([f"Context:\n{context}"] if context is not None else []) + [f"Question:\n{question}", "Choices:"]
  lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
  return "\n".join(lines + [MULTIPLE_CHOICE])


def vsr_prompt(statement: str) -> str:
  return f'Is the following statement "{statement}" true or false?'


def rec_prompt(expression: str) -> str:
  return f"Please provide the bounding box coordinate of the region this sentence describes: {expression}."


def reg_prompt(box_text: str) -> str:
  return f"Please provide a short description for this region: {box_text}."


def detection_prompt(class_plural: str) -> str:
  return f"Detect all {class_plural} shown in the image."


def pose_prompt(norm_box) -> str:
  """The demo writes this box with ", " separators, unlike answers."""
  return f"Detect the key points of the person in the region [{', '.join(f'{v:.2f}' for v in norm_box)}]."


# ----------------------------------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class Frame:
  """Where an original W x H image sits in its padded square (side = max(W, H), centred, integer offset)."""
  width: int
  height: int

  @property
  def side(self) -> int:
    return max(self.width, self.height)

  @property
  def offset(self) -> tuple[int, int]:
    return (self.side - self.width) // 2, (self.side - self.height) // 2

  def normalise(self, coords) -> list[float]:
    """Pixel x, y pairs of the original image -> [0, 1] in the padded square."""
    ox, oy = self.offset
    return [(v + (ox if i % 2 == 0 else oy)) / self.side for i, v in enumerate(coords)]

  def to_pixels(self, coords) -> list[float]:
    """Inverse of normalise."""
    ox, oy = self.offset
    return [v * self.side - (ox if i % 2 == 0 else oy) for i, v in enumerate(coords)]


def format_coords(norm) -> str:
  """[0.2612, 0.23] -> '0.26,0.23'. Values are clipped to [0, 1] first."""
  return ",".join(f"{min(max(v, 0.0), 1.0):.2f}" for v in norm)


def format_group(norm_list) -> str:
  """Boxes or points of one phrase -> '[b1;b2]'."""
  return "[" + ";".join(format_coords(c) for c in norm_list) + "]"


def encode(frame: Frame, pixel_list) -> str:
  """Pixel boxes/points of the original image -> '[x1,y1,x2,y2;...]' in the padded square."""
  return format_group([frame.normalise(c) for c in pixel_list])


def parse_group(inner: str) -> list[list[float]]:
  """'0.10,0.20,0.30,0.40;0.5,0.6' -> [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6]]; decimal numbers only (as the demo)."""
  return [[float(x) for x in _DECIMAL.findall(part)] for part in inner.split(";")]


# ----------------------------------------------------------------------------------------------- answers
def grounded(phrases_and_boxes) -> str:
  """[(phrase, [norm box, ...])] -> '<p>phrase</p>[b1;b2]' pieces, unjoined text left to the caller."""
  return "".join(f"<p>{p}</p>{format_group(b)}" for p, b in phrases_and_boxes)


def pose_answer(norm_points) -> str:
  """{keypoint name: (x, y) normalised} of the visible points -> our pose answer, COCO-17 order."""
  return " ".join(f"<p>{n.replace('_', ' ')}</p>{format_group([norm_points[n]])}"
                  for n in KEYPOINTS if n in norm_points)


def layout_answer(blocks) -> str:
  """[(class, norm box)] -> '<p>title</p>[b]<p>text</p>[b1;b2]…', LAYOUT_CLASSES order, top to bottom."""
  out = []
  for cls in LAYOUT_CLASSES:
    boxes = sorted((b for c, b in blocks if c == cls), key=lambda b: (b[1], b[0]))
    if boxes:
      out.append((cls, boxes))
  return grounded(out)


def short_answer(text: str) -> str:
  """Generated text -> the answer: cut at the "###" separator, stripped."""
  return cut_reply(text).strip()


def first_box(text: str) -> list[float] | None:
  """The REC evaluator's rule: the first '[…]' must hold exactly four comma-separated numbers, else None."""
  m = re.search(r"\[(.*?)\]", text)
  inner = m.group(1) if m else text.split("]")[0]
  parts = inner.split(",")
  try:
    return [float(p) for p in parts] if len(parts) == 4 else None
  except ValueError:
    return None


def all_boxes(text: str) -> list[list[float]]:
  """Every four-number group in every bracket, in reading order."""
  return [c for m in _BRACKET.finditer(text) for c in parse_group(m.group(1)) if len(c) == 4]


def phrases(text: str) -> list[tuple[str, list[list[float]]]]:
  """'<p>a</p>[b1;b2] … <p>c</p>[b3]' -> [('a', [b1, b2]), ('c', [b3])], as the demo parses them."""
  return [(m.group(1), parse_group(m.group(2))) for m in _PHRASE.finditer(text)]


def keypoints(text: str) -> dict[str, list[float]]:
  """Our pose answer -> {'left_eye': [x, y], ...}; unknown names and non-points are ignored."""
  out = {}
  for name, groups in phrases(text):
    key = name.strip().replace(" ", "_")
    if key in KEYPOINTS and groups and len(groups[0]) == 2:
      out[key] = groups[0]
  return out


def layout_blocks(text: str) -> list[tuple[str, list[float]]]:
  """Our layout answer -> [(class, box)], one entry per box; unknown classes are ignored."""
  return [(cls, b) for cls, groups in phrases(text) if cls in LAYOUT_CLASSES for b in groups if len(b) == 4]


def iou(a, b) -> float:
  """Intersection over union of two [x1, y1, x2, y2] boxes (0 when both are empty)."""
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0
