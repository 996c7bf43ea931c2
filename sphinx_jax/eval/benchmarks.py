"""Readers for the official annotation files of SPHINX's benchmarks, and each benchmark's prompt, decoding
length and scoring, as `accessory/eval_mm` (annotation_config.json, inference_image_sphinx.py) sets them.

A reader takes the benchmark's data directory (as the official download unpacks it) and a split, and returns
`Sample`s: id, image (a path, or encoded bytes for MMBench's base64 cells), the question as SPHINX is asked
it, the assistant pre-fill, and the ground truth the scorer needs (JSON-serialisable, so it is written to the
predictions file beside the output). Layouts read (ROOT = --data):
  vqav2     ROOT/v2_OpenEnded_mscoco_{split}_questions.json + v2_mscoco_{split}_annotations.json,
            images ROOT/{split}/COCO_{split}_{image_id:012d}.jpg                       (split: val2014)
  gqa       ROOT/{split}_questions.json ({qid: {imageId, question, answer}}), ROOT/images/{imageId}.jpg
            (split: testdev_balanced)
  textvqa   ROOT/TextVQA_0.5.1_{split}.json ({data: [...]}), ROOT/train_images/{image_id}.jpg  (split: val)
  vizwiz    ROOT/{split}.json ([{image, question, answers}]), ROOT/{split}/{image}           (split: val)
  pope      ROOT/coco_pope_{split}.json (JSON lines {question_id, image, text, label}), ROOT/val2014/{image}
            (split: random | popular | adversarial)
  mme       ROOT/{subtask}.txt (eval_tool's "image<TAB>question<TAB>answer" lines),
            images ROOT/{subtask}/images/{image} or ROOT/{subtask}/{image}              (split: unused)
  mmbench   ROOT/mmbench_{split}.tsv (index, question, hint, A..D, answer, category, image as base64)
            (split: dev_20230712)
  scienceqa ROOT/problems.json ({pid: {question, choices, answer, hint, image, split}}), image questions
            only, ROOT/images/{split}/{pid}/{image}                                      (split: test)
  refcoco   ROOT/{split}.jsonl (the accessory/Qwen-VL eval lines {image, sent, bbox [x1, y1, x2, y2],
            width, height}), image paths relative to ROOT      (split: refcoco_val, refcoco+_testA, ...)
"""
from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from sphinx_jax.data import tasks
from sphinx_jax.errors import SphinxError
from sphinx_jax.eval import metrics


@dataclasses.dataclass(frozen=True)
class Sample:
  id: str
  image: str | bytes
  question: str
  truth: Any
  prefill: str = ""


def _json(path: Path, what: str):
  if not path.is_file():
    raise SphinxError(f"{what}: {path} not found; point --data at the directory holding the official files.")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise SphinxError(f"{what}: {path} is not valid JSON ({error}); re-download the annotation file.") from None


def _field(row: dict, key: str, where: str):
  if not isinstance(row, dict) or key not in row:
    raise SphinxError(f"{where}: missing field '{key}'; is this the official annotation file?")
  return row[key]


def _answers(row: dict, where: str) -> list[str]:
  """VQAv2/VizWiz carry [{answer: ...}], TextVQA plain strings."""
  return [a["answer"] if isinstance(a, dict) else str(a) for a in _field(row, "answers", where)]


# ------------------------------------------------------------------------------------------------ readers
def read_vqav2(root: Path, split: str) -> list[Sample]:
  qpath, apath = root / f"v2_OpenEnded_mscoco_{split}_questions.json", root / f"v2_mscoco_{split}_annotations.json"
  questions = _field(_json(qpath, "vqav2"), "questions", str(qpath))
  answers = {_field(a, "question_id", str(apath)): _answers(a, f"{apath} question {a['question_id']}")
             for a in _field(_json(apath, "vqav2"), "annotations", str(apath))}
  out = []
  for q in questions:
    qid = _field(q, "question_id", str(qpath))
    if qid not in answers:
      raise SphinxError(f"vqav2: question {qid} of {qpath} has no entry in {apath}; use the files of one split.")
    image = root / split / f"COCO_{split}_{int(_field(q, 'image_id', str(qpath))):012d}.jpg"
    out.append(Sample(str(qid), str(image), tasks.short_answer_prompt(q["question"]), answers[qid]))
  return out


def read_gqa(root: Path, split: str) -> list[Sample]:
  path = root / f"{split}_questions.json"
  return [Sample(str(qid), str(root / "images" / f"{_field(q, 'imageId', f'{path} {qid}')}.jpg"),
                 tasks.short_answer_prompt(_field(q, "question", f"{path} {qid}")), _field(q, "answer", f"{path} {qid}"))
          for qid, q in _json(path, "gqa").items()]


def read_textvqa(root: Path, split: str) -> list[Sample]:
  path = root / f"TextVQA_0.5.1_{split}.json"
  return [Sample(str(_field(q, "question_id", str(path))), str(root / "train_images" / f"{q['image_id']}.jpg"),
                 tasks.short_answer_prompt(q["question"]), _answers(q, f"{path} {q['question_id']}"))
          for q in _field(_json(path, "textvqa"), "data", str(path))]


def read_vizwiz(root: Path, split: str) -> list[Sample]:
  path = root / f"{split}.json"
  return [Sample(_field(q, "image", str(path)), str(root / split / q["image"]),
                 tasks.short_answer_prompt(_field(q, "question", f"{path} {q['image']}"), vizwiz=True),
                 _answers(q, f"{path} {q['image']}"))
          for q in _json(path, "vizwiz")]


def read_pope(root: Path, split: str) -> list[Sample]:
  path = root / f"coco_pope_{split}.json"
  if not path.is_file():
    raise SphinxError(f"pope: {path} not found; point --data at the directory holding coco_pope_<split>.json.")
  out = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      q = json.loads(line)
    except json.JSONDecodeError:
      raise SphinxError(f"pope: {path} line {n} is not JSON; the file is one JSON object per line.") from None
    where = f"{path} line {n}"
    out.append(Sample(str(_field(q, "question_id", where)), str(root / "val2014" / _field(q, "image", where)),
                      _field(q, "text", where), _field(q, "label", where)))
  return out


def _mme_image(root: Path, subtask: str, name: str) -> Path:
  nested = root / subtask / "images" / name
  return nested if nested.exists() else root / subtask / name


def read_mme(root: Path, split: str) -> list[Sample]:
  del split  # MME has one split
  files = sorted(root.glob("*.txt"))
  if not files:
    raise SphinxError(f"mme: no <subtask>.txt files in {root}; use eval_tool/Your_Results-style files.")
  out = []
  for path in files:
    for n, line in enumerate(path.read_text().splitlines(), 1):
      if not line.strip():
        continue
      parts = line.split("\t")
      if len(parts) < 3:
        raise SphinxError(f"mme: {path} line {n} has {len(parts)} tab-separated fields; expected "
                          "image<TAB>question<TAB>answer.")
      image, question, answer = (p.strip() for p in parts[:3])
      out.append(Sample(f"{path.stem}/{n}", str(_mme_image(root, path.stem, image)),
                        tasks.short_answer_prompt(question), {"subtask": path.stem, "image": image, "answer": answer}))
  return out


def _cell(value: str | None) -> str | None:
  """MMBench leaves missing hints/options empty or 'nan' (pandas' writing of NaN)."""
  return None if value is None or value.strip() in ("", "nan", "NaN") else value


def read_mmbench(root: Path, split: str) -> list[Sample]:
  path = root / f"mmbench_{split}.tsv"
  if not path.is_file():
    raise SphinxError(f"mmbench: {path} not found; point --data at the directory holding mmbench_<split>.tsv.")
  csv.field_size_limit(1 << 30)  # base64 images are long cells
  out = []
  with path.open(newline="") as f:
    for n, row in enumerate(csv.DictReader(f, delimiter="\t"), 2):
      where = f"{path} line {n}"
      options = [row[k] for k in "ABCD" if _cell(row.get(k)) is not None]
      try:
        image = base64.b64decode(_field(row, "image", where), validate=True)
      except binascii.Error:
        raise SphinxError(f"mmbench: {where}: the image cell is not base64.") from None
      prompt = tasks.multiple_choice_prompt(_field(row, "question", where), options, context=_cell(row.get("hint")))
      out.append(Sample(str(_field(row, "index", where)), image, prompt,
                        {"index": int(row["index"]), "category": row.get("category", ""),
                         "answer": _field(row, "answer", where).strip()}))
  return out


def read_scienceqa(root: Path, split: str) -> list[Sample]:
  path = root / "problems.json"
  out = []
  for pid, p in _json(path, "scienceqa").items():
    if p.get("split") != split or not p.get("image"):
      continue
    where = f"{path} problem {pid}"
    choices, answer = _field(p, "choices", where), _field(p, "answer", where)
    prompt = tasks.multiple_choice_prompt(_field(p, "question", where), choices, context=p.get("hint") or None)
    out.append(Sample(str(pid), str(root / "images" / split / str(pid) / p["image"]), prompt,
                      {"answer": tasks.LETTERS[int(answer)], "letters": tasks.LETTERS[:len(choices)]},
                      prefill=tasks.SCIENCEQA_PREFILL))
  return out


def read_refcoco(root: Path, split: str) -> list[Sample]:
  path = root / f"{split}.jsonl"
  if not path.is_file():
    raise SphinxError(f"refcoco: {path} not found; point --data at the directory holding <split>.jsonl.")
  out = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      raise SphinxError(f"refcoco: {path} line {n} is not JSON; the file is one JSON object per line.") from None
    where = f"{path} line {n}"
    box = [float(v) for v in _field(r, "bbox", where)]
    if len(box) != 4:
      raise SphinxError(f"refcoco: {where}: bbox has {len(box)} numbers; expected [x1, y1, x2, y2].")
    out.append(Sample(f"{split}/{n}", str(root / _field(r, "image", where)), tasks.rec_prompt(_field(r, "sent", where)),
                      {"box": box, "width": int(_field(r, "width", where)), "height": int(_field(r, "height", where))}))
  return out


# ----------------------------------------------------------------------------------------------- scoring
def _mme_rows(rows):
  return [(r["truth"]["subtask"], r["truth"]["image"], r["output"], r["truth"]["answer"]) for r in rows]


def _mmbench_rows(rows):
  return [(r["truth"]["index"], r["truth"]["category"], r["output"], r["truth"]["answer"]) for r in rows]


def _mean_score(rows) -> dict[str, float]:
  return {"accuracy": 100 * sum(r["score"] for r in rows) / max(len(rows), 1)}


def _vqa_parse(out: str) -> str | None:
  return metrics.normalize_vqa(tasks.short_answer(out)) or None


def _mme_parse(out: str) -> str | None:
  answer = metrics.yes_no_mme(out)
  return None if answer == "other" else answer


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """read(root, split) -> samples; parse(reply) -> the answer as read (None: malformed, scored wrong);
  score(reply, truth) -> per-sample score in [0, 1]; summarize(rows) over the predictions file's rows (each
  with output, truth, score)."""
  read: Callable[[Path, str], list[Sample]]
  split: str
  max_new_tokens: int
  parse: Callable[[str], Any]
  score: Callable[[str, Any], float]
  summarize: Callable[[list[dict]], dict[str, float]] = _mean_score


BENCHMARKS = {
    "vqav2": Benchmark(read_vqav2, "val2014", 10, _vqa_parse, metrics.vqa_accuracy),
    "gqa": Benchmark(read_gqa, "testdev_balanced", 10, lambda out: metrics.plain_answer(out) or None,
                     metrics.exact_match),
    "textvqa": Benchmark(read_textvqa, "val", 10, _vqa_parse, metrics.vqa_accuracy),
    "vizwiz": Benchmark(read_vizwiz, "val", 10, _vqa_parse, metrics.vqa_accuracy),
    "pope": Benchmark(read_pope, "random", 10, metrics.yes_no_pope,
                      lambda out, label: float(metrics.yes_no_pope(out) == label.lower()),
                      lambda rows: {k: 100 * v for k, v in metrics.pope_scores(
                          [r["output"] for r in rows], [r["truth"] for r in rows]).items()}),
    "mme": Benchmark(read_mme, "-", 10, _mme_parse, lambda out, t: float(_mme_parse(out) == t["answer"].lower()),
                     lambda rows: metrics.mme_scores(_mme_rows(rows))),
    "mmbench": Benchmark(read_mmbench, "dev_20230712", 10, metrics.option_letter,
                         lambda out, t: float(metrics.option_letter(out) == t["answer"]),
                         lambda rows: metrics.mmbench_circular(_mmbench_rows(rows))),
    "scienceqa": Benchmark(read_scienceqa, "test", 10, lambda out: metrics.option_letter(out, tasks.LETTERS),
                           lambda out, t: float(metrics.option_letter(out, t["letters"]) == t["answer"])),
    "refcoco": Benchmark(read_refcoco, "refcoco_val", 30, lambda out: tasks.first_box(tasks.short_answer(out)),
                         lambda out, t: metrics.rec_correct(out, t["box"], t["width"], t["height"])),
}


def get(name: str) -> Benchmark:
  if name not in BENCHMARKS:
    raise SphinxError(f"unknown benchmark '{name}'; choose one of {', '.join(BENCHMARKS)}.")
  return BENCHMARKS[name]
