"""Training evaluation's scores, hand-computed: VQA accuracy per question type and per number of shapes, the
prior-only baseline, the asked shape's answer against another's; REC accuracy, mean IoU and accuracy per number of
shapes in the scene."""
import collections

import pytest

from sphinx_jax.data import shapes
from sphinx_jax.errors import SphinxError
from sphinx_jax.train import evaluation


def test_vqa_scores_by_hand():
  truths = [{"question_type": "how many", "answer": "2"}, {"question_type": "how many", "answer": "0"},
            {"question_type": "is the", "answer": "no"}]
  prior = {"how_many": "0", "is_the": "yes"}
  scores = evaluation.vqa_scores(["2", "1", " No"], truths, prior)
  assert scores == {"vqa/accuracy": pytest.approx(2 / 3), "vqa/prior_baseline": pytest.approx(1 / 3),
                    "vqa/accuracy/how_many": 0.5, "vqa/accuracy/is_the": 1.0}


def test_vqa_scores_tell_the_asked_shape_from_another():
  circle, square = shapes.Shape("circle", "red", (0, 0, 40, 40)), shapes.Shape("square", "blue", (60, 60, 99, 99))
  red_square = shapes.Shape("square", "red", (0, 60, 40, 99))
  colour = {"question_type": "what color is the", "answer": "red", "objects": [circle, square]}
  shape = {"question_type": "what shape is the", "answer": "square", "objects": [circle, square]}
  alone = {"question_type": "what color is the", "answer": "red", "objects": [circle]}
  same_colour = {"question_type": "what shape is the", "answer": "circle", "objects": [circle, red_square, square]}
  count = {"question_type": "how many", "answer": "1", "objects": [circle, square]}
  answers = ["Red", "circle", "red", "square", "2"]  # right, another shape's, right alone, another's, wrong count
  scores = evaluation.vqa_scores(answers, [colour, shape, alone, same_colour, count], {})
  assert scores["vqa/accuracy/objects_1"] == 1.0 and scores["vqa/accuracy/objects_2"] == pytest.approx(1 / 3)
  assert scores["vqa/accuracy/objects_3"] == 0.0
  assert (scores["vqa/named_shape"], scores["vqa/other_shape"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
  # the blue object asked about where every shape is blue: no other answer to give, so it is not counted
  blue = {"question_type": "what shape is the", "answer": "square", "objects": [square, shapes.Shape(
      "square", "blue", (0, 0, 40, 40))]}
  assert "vqa/other_shape" not in evaluation.vqa_scores(["square"], [blue], {})


def test_rec_scores_by_hand():
  # 100 x 100 images (no padding): a reply's box in [0, 1] is x100 pixels
  left, right = shapes.Shape("circle", "red", (0, 0, 40, 40)), shapes.Shape("square", "blue", (60, 60, 100, 100))
  one = {"objects": [left], "box": left.box, "size": (100, 100)}
  two = {"objects": [left, right], "box": left.box, "size": (100, 100)}
  answers = ["[0.00,0.00,0.40,0.20]",  # IoU 0.5 with the named shape
             "[0.00,0.00,0.40,0.40]",  # exact
             "[0.60,0.60,1.00,1.00]",  # the other shape's box
             "no box"]
  scores = evaluation.rec_scores(answers, [one, two, two, one])
  assert scores == {"rec/accuracy": 0.5, "rec/mean_iou": pytest.approx(0.375), "rec/accuracy/objects_1": 0.5,
                    "rec/accuracy/objects_2": 0.5, "rec/other_shape": 0.5}
  scores = evaluation.rec_scores(["[0.00,0.00,0.40,0.19]", "[0.60,0.60,1.00,1.00]"], [one, two])
  assert scores == {"rec/accuracy": 0.0, "rec/mean_iou": pytest.approx(0.475 / 2), "rec/accuracy/objects_1": 0.0,
                    "rec/accuracy/objects_2": 0.0, "rec/other_shape": 1.0}
  assert "rec/other_shape" not in evaluation.rec_scores(answers[:1], [one])


def test_prior_answers_are_each_types_most_frequent():
  world = shapes.World(seed=5, max_objects=3)
  prior = evaluation.prior_answers(world, n=60)
  counts = collections.defaultdict(collections.Counter)
  for i in range(60):
    truth = world.sample(i, "vqa")[2]
    counts[truth["question_type"].replace(" ", "_")][truth["answer"]] += 1
  assert set(prior) == set(counts)
  for kind, answer in prior.items():
    assert counts[kind][answer] == max(counts[kind].values())


def test_evaluation_world_follows_eval_config():
  from configs.demo import get_config
  config = get_config()
  config.eval.update(num_samples=6, tasks=("rec",), object_sides=(0.4, 0.45), max_objects=2)
  for _, _, truth in evaluation.Evaluator(config, None, None).samples["rec"]:
    shorter = min(truth["size"])
    assert 1 <= len(truth["objects"]) <= 2
    assert all(int(0.4 * shorter) <= o.box[2] - o.box[0] <= int(0.45 * shorter) for o in truth["objects"])


def test_unknown_eval_task_is_named():
  from configs.demo import get_config
  config = get_config()
  config.eval.tasks = ("vqa", "pose")
  with pytest.raises(SphinxError, match="config.eval.tasks"):
    evaluation.Evaluator(config, None, None)


def test_end_of_run_summary_lists_each_metric_per_step():
  from sphinx_jax.train.cli import summary_text
  text = summary_text({"last_step": 8, "loss": 0.5, "predictions": "w/predictions", "workdir": "w",
                       "eval": {0: {"vqa/accuracy": 0.0}, 8: {"vqa/accuracy": 0.75, "rec/accuracy": 0.5}}})
  lines = text.splitlines()
  assert lines[0] == "trained to step 8, last logged loss 0.500"
  assert lines[1].split() == ["held-out", "evaluation", "step", "0", "step", "8"]
  assert lines[2].split() == ["rec/accuracy", "-", "0.500"] and lines[3].split() == ["vqa/accuracy", "0.000", "0.750"]
  assert lines[-2:] == ["predictions drawn in w/predictions (and TensorBoard)", "summary: w/summary.json"]
