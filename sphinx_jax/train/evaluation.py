"""Periodic evaluation during training on held-out synthetic-world samples (greedy generation).

Metrics (eval/metrics.py, the benchmark evaluators' definitions, on our synthetic tasks):
  vqa/accuracy  GQA-style exact match of the short answer (cut at "###", lower-cased, stripped);
  rec/accuracy  the first predicted box, mapped from the padded square back to the original image, has
                IoU >= 0.5 with the ground-truth box.
A few predictions per task are drawn (inference/render.py) into WORKDIR/predictions/step_N/ and TensorBoard.
The Generator is built once, so evaluations after the first reuse its compiled programs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sphinx_jax.data import conversation, image as image_lib, shapes
from sphinx_jax.eval import metrics
from sphinx_jax.inference.generate import Generator
from sphinx_jax.inference.render import render_answer

METRICS = {"vqa": "accuracy", "rec": "accuracy"}


def _score(task: str, answer: str, truth) -> float:
  if task == "vqa":
    return metrics.exact_match(answer, str(truth["answer"]))
  return metrics.rec_correct(answer, truth["box"], *truth["size"])


class Evaluator:
  """Scores a model's params on `config.eval` (tasks, num_samples, world_seed, domain, max_new_tokens, batch)."""

  def __init__(self, config, model, tokenizer):
    self.config, self.model, self.tokenizer = config, model, tokenizer
    e = config.eval
    world = shapes.World(seed=e.world_seed, domain=e.domain)
    self.samples = {task: [world.sample(i, task) for i in range(e.num_samples)] for task in e.tasks}
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
      scores[f"{task}/{METRICS[task]}"] = float(np.mean([_score(task, a, s[2]) for a, s in zip(answers, samples)]))
      if log is not None:
        self._draw(task, samples, answers, out_dir, log, step)
    return scores

  def _draw(self, task, samples, answers, out_dir, log, step):
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, ((img, record, _), answer) in enumerate(list(zip(samples, answers))[:self.config.eval.num_drawn]):
      drawn = render_answer(img, answer)
      drawn.save(out_dir / f"{task}_{i}.png")
      log.image(f"predictions/{task}_{i}", step, np.asarray(drawn))
