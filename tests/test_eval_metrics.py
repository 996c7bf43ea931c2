"""Each benchmark metric against values worked out by hand from the official definitions."""
import pytest

from sphinx_jax.eval import metrics


@pytest.mark.parametrize("raw, normal", [
    ("Two Dogs!", "2 dogs"),          # number word, case, '!' not touching a space -> space
    ("dont", "don't"),                # contraction restored
    ("hedve", "he'd've"),             # both apostrophes missing
    ("1,000", "1000"),                # comma between digits: every mark deleted
    ("3.5", "3.5"),                   # decimal point kept
    ("yes.", "yes"),                  # other periods dropped
    ("The cat", "cat"),               # article
    ("left-side", "left side"),       # hyphen inside a word -> space
    ("a - b", "b"),                   # mark touching a space is deleted, then the article goes
    ("none", "0"),
    ("  red\tand\nblue ", "red and blue"),
])
def test_vqa_normalisation(raw, normal):
  assert metrics.normalize_vqa(raw) == normal


def test_vqa_accuracy_leave_one_out():
  gts = ["2 dogs"] * 3 + ["dogs"] * 7
  # the 3 '2 dogs' annotators each leave 2 matches (2/3), the 7 others leave 3 (1): (3 * 2/3 + 7) / 10
  assert metrics.vqa_accuracy("Two dogs!", gts) == pytest.approx(0.9)
  assert metrics.vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)  # 9 subsets with 1 match
  assert metrics.vqa_accuracy("dogs\n### Human: more", gts) == pytest.approx(1.0)  # cut at the separator
  assert metrics.vqa_accuracy("", gts) == 0.0
  assert metrics.vqa_accuracy("dont", ["don't"] * 10) == pytest.approx(1.0)


def test_gqa_exact_match():
  assert metrics.exact_match("Yes.", "yes") == 1.0
  assert metrics.exact_match(" left ", "left") == 1.0
  assert metrics.exact_match("left side", "left") == 0.0


def test_pope_scores():
  preds = ["Yes", "No, there is not.", "yes", "There is no dog.", "Yes. No other."]
  labels = ["yes", "no", "no", "yes", "yes"]
  # parsed yes, no, yes, no, yes -> tp 2, fp 1, fn 1, tn 1
  s = metrics.pope_scores(preds, labels)
  assert s["accuracy"] == pytest.approx(3 / 5)
  assert s["precision"] == pytest.approx(2 / 3)
  assert s["recall"] == pytest.approx(2 / 3)
  assert s["f1"] == pytest.approx(2 / 3)
  assert s["yes_ratio"] == pytest.approx(3 / 5)


def test_mme_scores():
  rows = [("existence", "1.jpg", "Yes", "Yes"), ("existence", "1.jpg", "No.", "No"),
          ("existence", "2.jpg", "Yes, there is", "Yes"), ("existence", "2.jpg", "Maybe", "No"),
          ("count", "3.jpg", "no", "Yes"), ("count", "3.jpg", "no", "No"),
          ("code_reasoning", "4.png", "yes", "Yes"), ("code_reasoning", "4.png", "NO", "No")]
  s = metrics.mme_scores(rows)
  assert s["existence"] == pytest.approx(75 + 50)   # 3 of 4 answers, 1 of 2 images
  assert s["count"] == pytest.approx(50 + 0)
  assert s["code_reasoning"] == pytest.approx(200)
  assert s["perception"] == pytest.approx(175)
  assert s["cognition"] == pytest.approx(200)


def test_mmbench_circular():
  rows = [  # question 7 asked in 4 rotations, one answered wrong -> the question fails
      (7, "attr", "A", "A"), (1_000_007, "attr", "B.", "B"), (2_000_007, "attr", "(C) cat", "C"),
      (3_000_007, "attr", "A", "D"),
      (8, "attr", "B", "B"), (1_000_008, "attr", "The answer is C", "C"),      # all right
      (9, "logic", "D", "D"), (1_000_009, "logic", "I cannot tell", "A")]      # no letter -> wrong
  s = metrics.mmbench_circular(rows)
  assert s["overall"] == pytest.approx(100 / 3)
  assert s["attr"] == pytest.approx(50)
  assert s["logic"] == pytest.approx(0)


@pytest.mark.parametrize("size, gt, right, unshifted", [
    ((400, 200), [100, 50, 200, 150], "[0.25,0.38,0.50,0.63]", "[0.25,0.12,0.50,0.38]"),   # wide: pad top
    ((200, 400), [50, 100, 150, 200], "[0.38,0.25,0.63,0.50]", "[0.12,0.25,0.38,0.50]"),   # tall: pad left
])
def test_rec_maps_back_through_the_padding(size, gt, right, unshifted):
  assert metrics.rec_correct(right, gt, *size) == 1.0
  assert metrics.rec_correct(unshifted, gt, *size) == 0.0  # the box read without the padding offset misses


def test_rec_threshold_and_malformed():
  assert metrics.rec_correct("[0.10,0.00,0.60,0.50]", [0, 0, 50, 50], 100, 100) == 1.0  # IoU 2000/3000
  assert metrics.rec_correct("[0.25,0.00,0.75,0.50]", [0, 0, 50, 50], 100, 100) == 0.0  # IoU 1250/3750
  assert metrics.rec_iou("[0.25,0.00,0.75,0.50]", [0, 0, 50, 50], 100, 100) == 1250 / 3750
  assert metrics.rec_iou("no box", [0, 0, 50, 50], 100, 100) == 0.0
  for bad in ["[0.1,0.2]", "no box", "[a,b,c,d]", ""]:
    assert metrics.rec_correct(bad, [0, 0, 50, 50], 100, 100) == 0.0
