"""Periodic evaluation during training on held-out synthetic-world samples (greedy generation).

Metrics (eval/metrics.py, the benchmark evaluators' definitions, on our synthetic tasks):
  vqa/accuracy  GQA-style exact match of the short answer (cut at "###", lower-cased, stripped), also per
                question type (vqa/accuracy/how_many, …);
  vqa/prior_baseline  the same score for answering every question with its type's most frequent answer in
                another sample of the world: what reading the question alone achieves, the bar image use must clear;
  vqa/accuracy/objects_N  vqa/accuracy on the scenes of N shapes;
  vqa/named_shape, vqa/other_shape  on the colour and shape questions about scenes where another shape's answer
                would differ, how often the reply is the asked shape's colour / shape, and how often another
                shape's: a model that reads some shape without following the question scores them about equally
                on 2-shape scenes (on the demo they show that VQA, like REC, does not yet select; NOTES.md);
  rec/accuracy  the first predicted box, mapped from the padded square back to the original image, has
                IoU >= 0.5 with the ground-truth box;
  rec/mean_iou  that IoU averaged (0 for a reply without a box): progress before boxes reach the threshold;
  rec/accuracy/objects_N  rec/accuracy on the scenes of N shapes: N = 1 needs no choice of object, so it
                separates reading a box from finding the named object;
  rec/other_shape  on scenes of several shapes, the fraction of replies whose box fits (IoU >= 0.5) another
                shape than the named one: a model that reads some shape's box but ignores the expression scores
                about N-1 times its accuracy there, one that follows the expression far less.
A few predictions per task are drawn (inference/render.py) into WORKDIR/predictions/step_N/ and TensorBoard.
The Generator is built once, so evaluations after the first reuse its compiled programs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sphinx_jax.data import conversation, image as image_lib, shapes
from sphinx_jax.errors import SphinxError
from sphinx_jax.eval import metrics
from sphinx_jax.inference.generate import Generator
from sphinx_jax.inference.render import render_answer

TASKS = ("vqa", "rec")
PRIOR_SAMPLES = 500


def _kind(truth) -> str:
  return truth["question_type"].replace(" ", "_")


def eval_world(e, seed: int) -> shapes.World:
  """The world of `config.eval` e with another seed."""
  return shapes.World(seed=seed, domain=e.domain, max_objects=e.get("max_objects") or 5,
                      object_sides=tuple(e.get("object_sides") or shapes.OBJECT_SIDES))


def prior_answers(world: shapes.World, n: int = PRIOR_SAMPLES) -> dict[str, str]:
  """Question type -> its most frequent answer over n VQA samples of `world` (ties: the first seen)."""
  counts = {}
  for i in range(n):
    truth = world.sample(i, "vqa")[2]
    by_answer = counts.setdefault(_kind(truth), {})
    by_answer[truth["answer"]] = by_answer.get(truth["answer"], 0) + 1
  return {kind: max(answers, key=answers.get) for kind, answers in counts.items()}


def rec_scores(answers, truths) -> dict[str, float]:
  """accuracy (IoU >= 0.5), mean IoU, accuracy per number of shapes in the scene, and how often the box fits
  another shape of a several-shape scene instead (truths: World.sample's, with "box", "size", "objects")."""
  ious = np.array([metrics.rec_iou(a, t["box"], *t["size"]) for a, t in zip(answers, truths)])
  scores = {"rec/accuracy": float(np.mean(ious >= 0.5)), "rec/mean_iou": float(np.mean(ious))}
  scores.update(_by_objects("rec/accuracy", ious >= 0.5, truths))
  others = [max(metrics.rec_iou(a, o.box, *t["size"]) for o in t["objects"] if tuple(o.box) != tuple(t["box"]))
            for a, t in zip(answers, truths) if len(t["objects"]) > 1]
  if others:
    scores["rec/other_shape"] = float(np.mean(np.asarray(others) >= 0.5))
  return scores


# The questions that name one shape and ask its colour or shape (shapes.vqa_question) -> the Shape field asked.
ASKED_ATTRIBUTE = {"what_color_is_the": "color", "what_shape_is_the": "shape"}


def other_answers(truth) -> set[str]:
  """What a colour / shape question would be answered with about the scene's other shapes, the right answer
  excluded (empty for other questions, and where every shape gives the right answer)."""
  attribute = ASKED_ATTRIBUTE.get(_kind(truth))
  if attribute is None:
    return set()
  return {getattr(o, attribute) for o in truth.get("objects", ())} - {str(truth["answer"])}


def _by_objects(prefix: str, correct, truths) -> dict[str, float]:
  """prefix/objects_N: the mean of `correct` over the scenes of N shapes (truths without objects: none)."""
  objects = np.array([len(t.get("objects", ())) for t in truths])
  return {f"{prefix}/objects_{n}": float(np.mean(np.asarray(correct)[objects == n]))
          for n in sorted(set(objects.tolist()) - {0})}


def vqa_scores(answers, truths, prior: dict[str, str]) -> dict[str, float]:
  """accuracy, accuracy per question type and per number of shapes, the prior-only baseline on the same questions,
  and on colour / shape questions with a distinguishable answer, the asked shape's answer against another's."""
  correct = [metrics.exact_match(a, str(t["answer"])) for a, t in zip(answers, truths)]
  scores = {"vqa/accuracy": float(np.mean(correct)),
            "vqa/prior_baseline": float(np.mean([prior.get(_kind(t)) == str(t["answer"]) for t in truths]))}
  for kind in sorted({_kind(t) for t in truths}):
    scores[f"vqa/accuracy/{kind}"] = float(np.mean([c for c, t in zip(correct, truths) if _kind(t) == kind]))
  scores.update(_by_objects("vqa/accuracy", correct, truths))
  others = [other_answers(t) for t in truths]
  selective = [(c, any(metrics.exact_match(a, o) for o in rest))
               for a, c, rest in zip(answers, correct, others) if rest]
  if selective:
    scores["vqa/named_shape"], scores["vqa/other_shape"] = (float(x) for x in np.mean(selective, axis=0))
  return scores


class Evaluator:
  """Scores a model's params on `config.eval` (tasks, num_samples, world_seed, domain, max_new_tokens, batch)."""

  def __init__(self, config, model, tokenizer):
    self.config, self.model, self.tokenizer = config, model, tokenizer
    e = config.eval
    if not set(e.tasks) <= set(TASKS):
      raise SphinxError(f"config.eval.tasks={tuple(e.tasks)}: training evaluation scores {TASKS}; drop the others.")
    world = eval_world(e, e.world_seed)
    self.samples = {task: [world.sample(i, task) for i in range(e.num_samples)] for task in e.tasks}
    self.prior = prior_answers(eval_world(e, e.world_seed + 1)) if "vqa" in e.tasks else {}
    self.generator = None

  def run(self, params, out_dir: Path, log=None, step: int = 0) -> dict:
    e = self.config.eval
    if self.generator is None:
      self.generator = Generator(self.model, params, self.tokenizer)
    self.generator.params = params
    scores = {}
    for task, samples in self.samples.items():
      answers = []
      for start in range(0, len(samples), e.batch):
        chunk = samples[start:start + e.batch]
        prompts = [conversation.encode_prompt(self.tokenizer, [], record.conversations[0]["value"])
                   for _, record, _ in chunk]
        images = np.stack([image_lib.load_padded(record.image, self.config.model.image_size)
                           for _, record, _ in chunk])
        answers += self.generator.generate(prompts, images, max_new_tokens=e.max_new_tokens, temperature=0.0)
      truths = [truth for _, _, truth in samples]
      if task == "vqa":
        scores.update(vqa_scores(answers, truths, self.prior))
      else:
        scores.update(rec_scores(answers, truths))
      if log is not None:
        self._draw(task, samples, answers, out_dir, log, step)
    return scores

  def _draw(self, task, samples, answers, out_dir, log, step):
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, ((img, record, _), answer) in enumerate(list(zip(samples, answers))[:self.config.eval.num_drawn]):
      drawn = render_answer(img, answer)
      drawn.save(out_dir / f"{task}_{i}.png")
      log.image(f"predictions/{task}_{i}", step, np.asarray(drawn))
