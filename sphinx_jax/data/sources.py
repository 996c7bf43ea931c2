"""Dataset readers: each is a random-access sequence of `Record`s with stable ids (`<dataset>:<key>`).

Mirrors what LLaMA2-Accessory's `FinetuneDialogDataset` reads (conversation JSON/JSONL items
{"image": path, "conversations": [{"from": "human"|"gpt", "value": ...}]}, SPHINX.md §6) and turns the public
annotation formats SPHINX trains on into such dialogues with the task prompts of `data/tasks.py` (§7):
  ConversationSource   LLaVA / Accessory conversation .json (a list) or .jsonl (one item per line)
  CocoSource           COCO annotation JSON: instances -> detection; refcoco-like refs -> REC / REG;
                       person_keypoints -> pose; PubLayNet-style layout sets -> layout
  Vqav2Source          VQAv2 questions + annotations -> short-answer VQA, target = most common answer
  TextSource           plain text, one document per line (a file) or per file (a folder of .txt)
  ArrayRecordSource    what `sphinx-jax prepare` writes: a tensorflow-datasets ArrayRecord directory, read with
                       `tfds.data_source` (no TensorFlow), images stored as encoded bytes

`source[i]` returns a Record or raises `BadRecord(reason, record_id)` for a record that must be skipped; the
pipeline counts those per reason. Problems with a whole file (missing, not JSON) raise `SphinxError` at open.
Sources are plain picklable objects, so Grain worker processes read them.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os

from sphinx_jax.data import tasks
from sphinx_jax.data.record import TASKS, Record
from sphinx_jax.errors import SphinxError

# Why a record is skipped. Image decoding and tokenisation happen later, in the pipeline's workers.
REASONS = ("malformed_json", "malformed_record", "no_assistant_turn", "bad_box", "bad_keypoints",
           "image_unreadable", "too_long", "untokenizable")
BOX_TOLERANCE = 1.0  # pixels: COCO boxes are floats that may overshoot the border by rounding


class BadRecord(SphinxError):
  """A record the pipeline skips and counts under `reason` (one of REASONS)."""

  def __init__(self, reason: str, record_id: str, detail: str):
    super().__init__(f"record {record_id}: {detail}")
    self.reason = reason
    self.record_id = record_id


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise SphinxError(f"{path}: file not found; check the dataset path in the data config.") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise SphinxError(f"{path}: not valid JSON ({error}); fix or regenerate the file.") from None


def _join(root: str | None, path: str) -> str:
  return path if root is None or os.path.isabs(path) else os.path.join(root, path)


def _dialog(question: str, answer: str) -> tuple:
  return ({"from": "human", "value": question}, {"from": "gpt", "value": answer})


# ------------------------------------------------------------------------------------------ (a) dialogues
def check_conversations(conversations, record_id: str) -> tuple:
  """Validates the original's item shape; returns the turns as a tuple of {"from", "value"} dicts."""
  if not isinstance(conversations, list) or not conversations:
    raise BadRecord("malformed_record", record_id, "'conversations' is missing or not a non-empty list")
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"),
                                                                                              str):
      raise BadRecord("malformed_record", record_id, f"turn {i} is not {{'from': str, 'value': str}}")
  if not any(t["from"].lower() in ("gpt", "assistant") for t in conversations):
    raise BadRecord("no_assistant_turn", record_id, "no 'gpt'/'assistant' turn, nothing to learn")
  return tuple({"from": t["from"], "value": t["value"]} for t in conversations)


class ConversationSource:
  """Conversation items from `.json` (a list) or `.jsonl`; JSONL lines are parsed when read, so one broken
  line is one skipped record. Relative image paths are joined to `image_root`. Ids: `<name>:<item index>`;
  an item's "task" is kept when it is one of record.TASKS (shapes.write_accessory writes it), else
  "conversation"."""

  def __init__(self, path: str, image_root: str | None = None, name: str = "conversations"):
    self.name, self.image_root = name, image_root
    if path.endswith(".jsonl"):
      try:
        with open(path, encoding="utf-8") as f:
          self._items = [line for line in f.read().splitlines() if line.strip()]
      except FileNotFoundError:
        raise SphinxError(f"{path}: file not found; check the dataset path in the data config.") from None
    else:
      self._items = _read_json(path)
      if not isinstance(self._items, list):
        raise SphinxError(f"{path}: expected a JSON list of conversation items; use .jsonl for one per line.")

  def __len__(self):
    return len(self._items)

  def __getitem__(self, index: int) -> Record:
    record_id = f"{self.name}:{index}"
    item = self._items[index]
    if isinstance(item, str):
      try:
        item = json.loads(item)
      except json.JSONDecodeError as error:
        raise BadRecord("malformed_json", record_id, f"line is not JSON ({error})") from None
    if not isinstance(item, dict):
      raise BadRecord("malformed_record", record_id, "item is not a JSON object")
    conversations = check_conversations(item.get("conversations"), record_id)
    image = item.get("image")
    if image is not None and not isinstance(image, str):
      raise BadRecord("malformed_record", record_id, "'image' is not a path string")
    task = item.get("task") if item.get("task") in TASKS and item.get("task") != "text" else "conversation"
    return Record(id=record_id, task=task, conversations=conversations,
                  image=None if image is None else _join(self.image_root, image))


# ------------------------------------------------------------------------------------------ (b) COCO
def _check_box(xywh, width, height, record_id) -> list[float]:
  """COCO [x, y, w, h] -> [x1, y1, x2, y2] pixels; degenerate or outside the image -> BadRecord."""
  if not (isinstance(xywh, list) and len(xywh) == 4 and all(isinstance(v, (int, float)) for v in xywh)):
    raise BadRecord("bad_box", record_id, f"bbox {xywh!r} is not four numbers")
  x, y, w, h = xywh
  if w <= 0 or h <= 0:
    raise BadRecord("bad_box", record_id, f"degenerate bbox {xywh} (width or height <= 0)")
  t = BOX_TOLERANCE
  if x < -t or y < -t or x + w > width + t or y + h > height + t:
    raise BadRecord("bad_box", record_id, f"bbox {xywh} lies outside the {width}x{height} image")
  return [x, y, x + w, y + h]


def _check_keypoints(flat, box, record_id) -> dict:
  """COCO [x, y, v] * 17 -> {name: (x, y)} of the visible points (v = 2; occluded ones, v = 1, are omitted
  from answers as in tasks.pose_answer); any labelled point (v > 0) off its box -> BadRecord."""
  if not (isinstance(flat, list) and len(flat) == 3 * len(tasks.KEYPOINTS)):
    raise BadRecord("bad_keypoints", record_id, f"expected {3 * len(tasks.KEYPOINTS)} keypoint values")
  points, t = {}, BOX_TOLERANCE
  for k, name in enumerate(tasks.KEYPOINTS):
    x, y, v = flat[3 * k:3 * k + 3]
    if v <= 0:
      continue
    if not (box[0] - t <= x <= box[2] + t and box[1] - t <= y <= box[3] + t):
      raise BadRecord("bad_keypoints", record_id, f"keypoint {name} ({x}, {y}) lies outside its box {box}")
    if v == 2:
      points[name] = (x, y)
  return points


def plural(name: str) -> str:
  """Category name -> the plural the detection prompt uses ("Detect all people shown in the image.")."""
  if name == "person":
    return "people"
  return name + ("es" if name.endswith(("s", "x", "ch", "sh")) else "s")


COCO_TASKS = ("detection", "rec", "reg", "pose", "layout")


def _id_order(key):
  """Sort key for COCO ids: ints by value; malformed ones (None, strings) after them."""
  return (0, key, "") if isinstance(key, int) else (1, 0, str(key))


@dataclasses.dataclass(frozen=True)
class _Item:
  """One record to build: the task, the image id and what the task needs (annotation ids, a sentence)."""
  kind: str
  image_id: int
  key: str
  ann_ids: tuple = ()
  sentence: str = ""


class CocoSource:
  """COCO annotation JSON -> one task's records.

  task "detection": one record per (image, category present): "Detect all <plural> shown in the image." ->
    `<p>name</p>[b1;b2]`, boxes left to right; one bad box spoils the record (dropping it would teach the model to miss objects).
  task "rec" / "reg": `refs` is a JSON list of refcoco-style refs {"ref_id", "ann_id", "image_id",
    "sentences": [{"sent": str}, ...]} over the instances file; one record per sentence (REC: expression -> box;
    REG: box -> expression).
  task "pose": person_keypoints; one record per non-crowd person with labelled keypoints: the box prompt ->
    our COCO-17 pose answer (tasks.pose_answer).
  task "layout": one record per page; categories must be tasks.LAYOUT_CLASSES (PubLayNet); DocLayNet's classes
    need mapping first.
  Crowd annotations (iscrowd=1) are not used. Ids: `<name>:<image id>[:<category id> | :<ann id> | :<ref>.<k>]`.
  """

  def __init__(self, annotations: str, image_root: str | None, task: str, refs: str | None = None,
               name: str = "coco"):
    if task not in COCO_TASKS:
      raise SphinxError(f"dataset {name}: unknown COCO task {task!r}; use one of {COCO_TASKS}.")
    if task in ("rec", "reg") and refs is None:
      raise SphinxError(f"dataset {name}: task {task} needs a refs file (refcoco-like JSON list); set 'refs'.")
    self.name, self.task, self.image_root = name, task, image_root
    coco = _read_json(annotations)
    try:
      self._images = {int(i["id"]): (i["file_name"], int(i["width"]), int(i["height"])) for i in coco["images"]}
      self._categories = {int(c["id"]): c["name"] for c in coco["categories"]}
      self._anns = {int(a["id"]): a for a in coco["annotations"]}
    except (KeyError, TypeError, ValueError) as error:
      raise SphinxError(f"{annotations}: not a COCO annotation file (missing {error}); it needs 'images' with "
                        f"id/file_name/width/height, 'categories' and 'annotations'.") from None
    if task == "layout":
      unknown = sorted(set(self._categories.values()) - set(tasks.LAYOUT_CLASSES))
      if unknown:
        raise SphinxError(f"{annotations}: layout categories {unknown} are not {tasks.LAYOUT_CLASSES}; map them "
                          f"to PubLayNet's classes first.")
    self._items = self._index(refs)

  def _index(self, refs_path) -> list[_Item]:
    by_image = collections.defaultdict(list)
    for ann_id, ann in sorted(self._anns.items()):
      if not ann.get("iscrowd", 0):
        by_image[ann.get("image_id")].append(ann_id)
    images = sorted(by_image, key=_id_order)
    if self.task == "detection":
      return [item for i in images for item in self._detection_items(i, by_image[i])]
    if self.task == "layout":
      return [_Item("layout", i, str(i), tuple(by_image[i])) for i in images]
    if self.task == "pose":
      return [_Item("pose", i, f"{i}:{a}", (a,)) for i in images for a in by_image[i]
              if self._anns[a].get("num_keypoints", 1)]
    return self._ref_items(refs_path)

  def _detection_items(self, image_id, ann_ids) -> list[_Item]:
    by_cat = collections.defaultdict(list)
    for ann_id in ann_ids:
      by_cat[self._anns[ann_id].get("category_id")].append(ann_id)
    return [_Item("detection", image_id, f"{image_id}:{c}", tuple(by_cat[c])) for c in sorted(by_cat, key=_id_order)]

  def _ref_items(self, refs_path) -> list[_Item]:
    refs = _read_json(refs_path)
    if not isinstance(refs, list):
      raise SphinxError(f"{refs_path}: expected a JSON list of refs.")
    items = []
    for n, ref in enumerate(refs):
      ref = ref if isinstance(ref, dict) else {}
      sentences = ref.get("sentences") if isinstance(ref.get("sentences"), list) else [None]
      for k, sentence in enumerate(sentences):
        text = sentence.get("sent") if isinstance(sentence, dict) else None
        items.append(_Item(self.task, ref.get("image_id"), f"{ref.get('image_id')}:{ref.get('ref_id', n)}.{k}",
                           (ref.get("ann_id"),), text if isinstance(text, str) else ""))
    return items

  def __len__(self):
    return len(self._items)

  def __getitem__(self, index: int) -> Record:
    item = self._items[index]
    record_id = f"{self.name}:{item.key}"
    if item.image_id not in self._images:
      raise BadRecord("malformed_record", record_id, f"image id {item.image_id!r} is not in 'images'")
    file_name, width, height = self._images[item.image_id]
    frame = tasks.Frame(width, height)
    anns = [self._anns.get(a) for a in item.ann_ids]
    if any(a is None for a in anns):
      raise BadRecord("malformed_record", record_id, f"annotation id(s) {item.ann_ids} not in 'annotations'")
    boxes = [_check_box(a.get("bbox"), width, height, record_id) for a in anns]
    conversations = getattr(self, f"_{item.kind}")(item, anns, boxes, frame, record_id)
    return Record(id=record_id, task=item.kind, conversations=conversations,
                  image=_join(self.image_root, file_name))

  def _category(self, ann, record_id):
    if ann.get("category_id") not in self._categories:
      raise BadRecord("malformed_record", record_id, f"category {ann.get('category_id')!r} is unknown")
    return self._categories[ann["category_id"]]

  def _detection(self, item, anns, boxes, frame, record_id):
    name = self._category(anns[0], record_id)
    boxes = sorted(boxes, key=lambda b: (b[0] + b[2], b[1] + b[3]))  # left to right, like the shapes world
    answer = tasks.grounded([(name, [frame.normalise(b) for b in boxes])])
    return _dialog(tasks.detection_prompt(plural(name)), answer)

  def _layout(self, item, anns, boxes, frame, record_id):
    blocks = [(self._category(a, record_id), frame.normalise(b)) for a, b in zip(anns, boxes)]
    return _dialog(tasks.LAYOUT_PROMPT, tasks.layout_answer(blocks))

  def _pose(self, item, anns, boxes, frame, record_id):
    points = _check_keypoints(anns[0].get("keypoints"), boxes[0], record_id)
    if not points:
      raise BadRecord("bad_keypoints", record_id, "no visible keypoint")
    norm = {k: frame.normalise(p) for k, p in points.items()}
    return _dialog(tasks.pose_prompt(frame.normalise(boxes[0])), tasks.pose_answer(norm))

  def _rec(self, item, anns, boxes, frame, record_id):
    if not item.sentence.strip():
      raise BadRecord("malformed_record", record_id, "ref sentence is missing or empty")
    return _dialog(tasks.rec_prompt(item.sentence.strip()), tasks.encode(frame, boxes))

  def _reg(self, item, anns, boxes, frame, record_id):
    if not item.sentence.strip():
      raise BadRecord("malformed_record", record_id, "ref sentence is missing or empty")
    return _dialog(tasks.reg_prompt(tasks.encode(frame, boxes)), item.sentence.strip())


# ------------------------------------------------------------------------------------------ (c) VQAv2
def most_common_answer(answers) -> str:
  """The target of a VQAv2 question: the most frequent of its (ten) answers; ties go to the first given."""
  counts = collections.Counter(a["answer"] for a in answers)
  return counts.most_common(1)[0][0]


class Vqav2Source:
  """VQAv2 `questions` + `annotations` JSON -> short-answer VQA records (question + tasks.SHORT_ANSWER).

  Image files are named by `image_pattern` formatted with the image id and the questions' `data_subtype`
  (COCO's "COCO_{subtype}_{image_id:012d}.jpg" by default). Ids: `<name>:<question id>`.
  """

  def __init__(self, questions: str, annotations: str, image_root: str | None,
               image_pattern: str = "COCO_{subtype}_{image_id:012d}.jpg", name: str = "vqav2"):
    self.name, self.image_root, self.image_pattern = name, image_root, image_pattern
    q, a = _read_json(questions), _read_json(annotations)
    try:
      self._subtype = q.get("data_subtype", "")
      self._questions = list(q["questions"])
      self._answers = {x.get("question_id"): x for x in a["annotations"]}
    except (KeyError, TypeError, AttributeError) as error:
      raise SphinxError(f"{questions} / {annotations}: not VQAv2 files (missing {error}); expected "
                        f"{{'questions': [...]}} and {{'annotations': [...]}}.") from None

  def __len__(self):
    return len(self._questions)

  def __getitem__(self, index: int) -> Record:
    q = self._questions[index]
    record_id = f"{self.name}:{q.get('question_id', index) if isinstance(q, dict) else index}"
    if not isinstance(q, dict) or not isinstance(q.get("question"), str) or "image_id" not in q:
      raise BadRecord("malformed_record", record_id, "question entry lacks 'question' or 'image_id'")
    annotation = self._answers.get(q.get("question_id"))
    answers = annotation.get("answers") if isinstance(annotation, dict) else None
    if not answers or not all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in answers):
      raise BadRecord("no_assistant_turn", record_id, "no annotated answers for this question")
    image = self.image_pattern.format(subtype=self._subtype, image_id=q["image_id"])
    return Record(id=record_id, task="vqa", image=_join(self.image_root, image),
                  conversations=_dialog(tasks.short_answer_prompt(q["question"]), most_common_answer(answers)))


# ------------------------------------------------------------------------------------------ (d) text
class TextSource:
  """Plain text for the text-only loss: a file (one document per non-empty line) or a folder (one document per
  `.txt` file, sorted by name). Ids: `<name>:<line index>` or `<name>:<file name>`."""

  def __init__(self, path: str, name: str = "text"):
    self.name = name
    if os.path.isdir(path):
      self._root = path
      self._docs = sorted(f for f in os.listdir(path) if f.endswith(".txt"))
    elif os.path.isfile(path):
      self._root = None
      with open(path, encoding="utf-8", errors="replace") as f:
        self._docs = [line for line in f.read().splitlines() if line.strip()]
    else:
      raise SphinxError(f"{path}: no such text file or folder; check the dataset path in the data config.")
    if not self._docs:
      raise SphinxError(f"{path}: no documents found (empty file or no .txt files).")

  def __len__(self):
    return len(self._docs)

  def __getitem__(self, index: int) -> Record:
    if self._root is None:
      return Record(id=f"{self.name}:{index}", task="text", text=self._docs[index])
    record_id = f"{self.name}:{self._docs[index]}"
    try:
      with open(os.path.join(self._root, self._docs[index]), encoding="utf-8") as f:
        return Record(id=record_id, task="text", text=f.read())
    except (OSError, UnicodeDecodeError) as error:
      raise BadRecord("malformed_record", record_id, f"cannot read the document ({error})") from None


# ------------------------------------------------------------------------------------------ (e) ArrayRecord
class ArrayRecordSource:
  """A directory written by `sphinx-jax prepare` (tfds ArrayRecord, version folder inside), read without
  TensorFlow. Stored features: id, task, conversations (JSON text), image (encoded bytes, b"" for none), text."""

  def __init__(self, path: str, split: str = "train", name: str | None = None):
    import tensorflow_datasets as tfds  # heavy; only readers of prepared data pay for it
    try:
      self._data = tfds.builder_from_directory(path).as_data_source()[split]
    except Exception as error:  # tfds raises many types for a wrong folder
      raise SphinxError(f"{path}: not a prepared dataset with split {split!r} ({type(error).__name__}: "
                        f"{error}); run `sphinx-jax prepare` and point to its version folder.") from None
    self.name = name

  def __len__(self):
    return len(self._data)

  def __getitem__(self, index: int) -> Record:
    row = self._data[index]
    record_id = row["id"].decode()
    if self.name:
      record_id = f"{self.name}:{record_id}"
    text = row["text"].decode()
    return Record(id=record_id, task=row["task"].decode(), conversations=tuple(json.loads(row["conversations"])),
                  image=bytes(row["image"]) or None, text=text or None)


# ------------------------------------------------------------------------------------------ from config
KINDS = ("conversations", "coco", "vqav2", "text", "arrayrecord", "synthetic")


def open_source(name: str, cfg):
  """A data-config dataset entry (see config.dataset_config) -> its source object."""
  kind = cfg.kind
  if cfg.get("as_text") and kind != "synthetic":
    raise SphinxError(f"config.data.datasets.{name}.as_text: only the synthetic world describes its scenes in words; "
                      f"remove it from this {kind!r} dataset.")
  if kind == "conversations":
    return ConversationSource(cfg.path, cfg.get("image_root"), name=name)
  if kind == "coco":
    return CocoSource(cfg.path, cfg.get("image_root"), cfg.task, refs=cfg.get("refs"), name=name)
  if kind == "vqav2":
    return Vqav2Source(cfg.path, cfg.annotations, cfg.get("image_root"), name=name)
  if kind == "text":
    return TextSource(cfg.path, name=name)
  if kind == "arrayrecord":
    return ArrayRecordSource(cfg.path, cfg.get("split") or "train")
  if kind == "synthetic":  # the shapes world, generated on the fly (the demo's embedded data)
    from sphinx_jax.data import shapes
    task = cfg.task or shapes.WORLD_TASKS
    world = shapes.World(seed=cfg.get("seed") or 0, domain=cfg.get("domain") or "flat",
                         max_objects=cfg.get("max_objects") or 5,
                         object_sides=tuple(cfg.get("object_sides") or shapes.OBJECT_SIDES))
    return shapes.WorldSource(world, (task,) if isinstance(task, str) else tuple(task),
                              length=cfg.get("length") or 100_000, turns=cfg.get("turns") or 1,
                              as_text=bool(cfg.get("as_text")))
  raise SphinxError(f"config.data.datasets.{name}.kind: unknown kind {kind!r}; use one of {KINDS}.")
