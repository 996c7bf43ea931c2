"""Benchmark metrics, to the definitions of the official evaluators SPHINX reports against.

- VQA accuracy (VQAv2 `vqaEval.py`, also TextVQA / VizWiz / OKVQA): answers normalised (newlines/tabs to
  spaces, punctuation rule, lower case, number words to digits, articles dropped, apostrophe-less
  contractions restored); a prediction scores min(#matching annotators / 3, 1) averaged over the 10
  leave-one-annotator-out subsets. Ground-truth answers go through the same normalisation (the EvalAI
  processor's habit), so raw annotation strings may be passed.
- GQA exact match: lower-cased, stripped, trailing period dropped, equal to the answer.
- POPE (LLaVA's `eval_pope.py`): a reply is "no" when its first sentence holds the word no/not, else "yes";
  accuracy, precision, recall, F1 with "yes" positive, and the yes-ratio.
- MME (`eval_tool/calculation.py`): a reply is yes/no when it is that word (lower case, periods removed) or
  its first four characters contain it, else "other" (wrong). Per subtask: accuracy (%) + accuracy+ (% of
  images with both questions right); a category's score is the sum over its subtasks.
- MMBench circular evaluation: the variants of one question (options rotated; index mod 1e6 shared) count
  as right only if every variant's predicted letter is right.
- REC accuracy: the first predicted box (tasks.first_box), normalised to the padded square, is mapped back
  to original pixels (tasks.Frame) and scores when IoU >= 0.5 with the ground truth [x1, y1, x2, y2].

Every scorer takes raw model text; a malformed reply scores 0 and never raises.
"""
from __future__ import annotations

import re
from collections import defaultdict

from sphinx_jax.data import tasks

# ------------------------------------------------------------------------------------------- VQA normaliser
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")  # the official pattern's look-behind is malformed: only this acts
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())} | {"none": "0"}
_ARTICLES = {"a", "an", "the"}
# Contracted forms (the official map's I-forms are capitalised, so never match lower-cased text, and are left
# out); the official map restores each from its spelling with any of its apostrophes left out.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she'd she'll she's
should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've
someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's they'd
they'd've they'll they're they've 'twas wasn't we'd we'd've we'll we're we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _contraction_map() -> dict[str, str]:
  """'dont' -> "don't", "hed've" / "he'dve" / "hedve" -> "he'd've": every apostrophe subset dropped."""
  out = {}
  for word in _CONTRACTED:
    parts = word.split("'")
    for mask in range(2 ** (len(parts) - 1) - 1):  # every pattern except 'all apostrophes kept'
      text = parts[0]
      for i, part in enumerate(parts[1:]):
        text += ("" if mask >> i & 1 == 0 else "'") + part
      out.setdefault(text, word)
  return out


_CONTRACTIONS = _contraction_map()


def _punctuation(text: str) -> str:
  """The official rule: a mark touching a space (or any text with a digit,digit comma) is deleted, otherwise
  replaced by a space; then periods that are not decimal points go."""
  out = text
  for p in _PUNCT:
    if f"{p} " in text or f" {p}" in text or _COMMA_BETWEEN_DIGITS.search(text):
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_NOT_DECIMAL.sub("", out)


def _digits_articles(text: str) -> str:
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa(answer: str) -> str:
  """'Two Dogs!' -> '2 dogs'; 'dont' -> "don't"; '1,000' -> '1000'; '3.5' stays; 'yes.' -> 'yes'."""
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, gt_answers) -> float:
  """Raw reply, the (usually 10) annotators' answers -> mean over leave-one-out subsets of min(matches/3, 1)."""
  pred = normalize_vqa(tasks.short_answer(prediction))
  gts = [normalize_vqa(a) for a in gt_answers]
  if not gts:
    return 0.0
  scores = []
  for i in range(len(gts)):
    matches = sum(g == pred for j, g in enumerate(gts) if j != i)
    scores.append(min(1.0, matches / 3))
  return sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------------- GQA
def plain_answer(text: str) -> str:
  """GQA's comparison form: cut at '###', lower case, stripped, no trailing period."""
  return tasks.short_answer(text).lower().strip().rstrip(".").strip()


def exact_match(prediction: str, answer: str) -> float:
  """GQA: 1 when the reply equals the answer, both in plain_answer form."""
  return float(plain_answer(prediction) == plain_answer(answer))


# ------------------------------------------------------------------------------------------------- POPE
def yes_no_pope(prediction: str) -> str:
  """LLaVA's POPE rule: first sentence, words split on spaces; any of no/not/No -> 'no', else 'yes'."""
  first = tasks.short_answer(prediction).split(".")[0].replace(",", "")
  return "no" if {"no", "not", "No"} & set(first.split()) else "yes"


def pope_scores(predictions, labels) -> dict[str, float]:
  """Raw replies and 'yes'/'no' labels -> accuracy, precision, recall, f1 ('yes' positive), yes_ratio."""
  pred = [yes_no_pope(p) == "yes" for p in predictions]
  gold = [str(label).strip().lower() == "yes" for label in labels]
  tp = sum(p and g for p, g in zip(pred, gold))
  fp = sum(p and not g for p, g in zip(pred, gold))
  fn = sum(g and not p for p, g in zip(pred, gold))
  n = max(len(pred), 1)
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / n, "precision": precision, "recall": recall,
          "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
          "yes_ratio": sum(pred) / n}


# -------------------------------------------------------------------------------------------------- MME
MME_CATEGORIES = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}


def yes_no_mme(prediction: str) -> str:
  text = tasks.short_answer(prediction).lower().strip().replace(".", "")
  if text in ("yes", "no"):
    return text
  head = text[:4]
  return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(rows) -> dict[str, float]:
  """rows: (subtask, image, raw reply, 'Yes'/'No') -> {'<subtask>': acc + acc+, 'perception': sum,
  'cognition': sum}; subtasks outside MME_CATEGORIES are reported but summed nowhere."""
  by_image = defaultdict(list)
  for subtask, image, prediction, answer in rows:
    by_image[subtask, image].append(yes_no_mme(prediction) == str(answer).strip().lower())
  per_task = defaultdict(list)
  for (subtask, _), right in by_image.items():
    per_task[subtask].append(right)
  out = {}
  for subtask, images in per_task.items():
    answers = [r for image in images for r in image]
    out[subtask] = 100 * sum(answers) / len(answers) + 100 * sum(all(i) for i in images) / len(images)
  for category, names in MME_CATEGORIES.items():
    out[category] = sum(out.get(n, 0.0) for n in names)
  return out


# ---------------------------------------------------------------------------------------------- MMBench
CIRCULAR_STRIDE = 1_000_000  # MMBench stores the k-th rotation of question i as index i + k * 1e6


def option_letter(prediction: str, letters: str = "ABCD") -> str | None:
  """First standalone option letter in the reply ('B', 'B.', '(B) cat', 'The answer is B'); None if none."""
  m = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", tasks.short_answer(prediction))
  return m.group(1) if m else None


def mmbench_circular(rows) -> dict[str, float]:
  """rows: (index, category, raw reply, answer letter) -> {'overall': %, '<category>': %}: a question counts
  only when all of its rotations are answered right."""
  groups = defaultdict(list)
  category = {}
  for index, cat, prediction, answer in rows:
    base = int(index) % CIRCULAR_STRIDE
    groups[base].append(option_letter(prediction) == str(answer).strip())
    category[base] = cat
  right = {base: all(v) for base, v in groups.items()}
  out = {"overall": 100 * sum(right.values()) / max(len(right), 1)}
  for cat in sorted(set(category.values())):
    bases = [b for b in right if category[b] == cat]
    out[cat] = 100 * sum(right[b] for b in bases) / len(bases)
  return out


# -------------------------------------------------------------------------------------------------- REC
def rec_iou(prediction: str, box, width: int, height: int) -> float:
  """IoU of the reply's first box, mapped from the padded square to W x H pixels, with `box` ([x1, y1, x2, y2]
  pixels of the original image); 0 when the reply holds no box."""
  pred = tasks.first_box(tasks.short_answer(prediction))
  if pred is None:
    return 0.0
  return tasks.iou(tasks.Frame(width, height).to_pixels(pred), box)


def rec_correct(prediction: str, box, width: int, height: int, threshold: float = 0.5) -> float:
  """1 when `rec_iou` reaches the threshold (REC accuracy at IoU >= 0.5), else 0."""
  return float(rec_iou(prediction, box, width, height) >= threshold)
