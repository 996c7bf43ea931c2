"""Benchmark readers on small fixtures written here in each official format: prompts as the original asks
them, ground truth as the scorers need it, and a clear error on a broken file."""
import base64
import io
import json

import pytest
from PIL import Image

from sphinx_jax.data import tasks
from sphinx_jax.errors import SphinxError
from sphinx_jax.eval import benchmarks


def png(color=(255, 0, 0)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (6, 4), color).save(buf, format="PNG")
  return buf.getvalue()


def write(path, content):
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
  return path


def test_vqav2(tmp_path):
  write(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
        {"questions": [{"image_id": 42, "question": "What color?", "question_id": 420}]})
  write(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [
      {"question_id": 420, "image_id": 42, "multiple_choice_answer": "red",
       "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["red"] * 10)]}]})
  [s] = benchmarks.read_vqav2(tmp_path, "val2014")
  assert s.id == "420" and s.truth == ["red"] * 10
  assert s.image == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
  assert s.question == tasks.short_answer_prompt("What color?") and s.prefill == ""


def test_vqav2_question_without_annotation(tmp_path):
  write(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
        {"questions": [{"image_id": 1, "question": "Q?", "question_id": 7}]})
  write(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": []})
  with pytest.raises(SphinxError, match="question 7 .* has no entry"):
    benchmarks.read_vqav2(tmp_path, "val2014")


def test_gqa(tmp_path):
  write(tmp_path / "testdev_balanced_questions.json",
        {"20968013": {"imageId": "n288870", "question": "Is the sky blue?", "answer": "yes", "types": {}}})
  [s] = benchmarks.read_gqa(tmp_path, "testdev_balanced")
  assert (s.id, s.truth) == ("20968013", "yes")
  assert s.image == str(tmp_path / "images" / "n288870.jpg")
  assert s.question.endswith(tasks.SHORT_ANSWER)


def test_textvqa(tmp_path):
  write(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
      {"question_id": 34602, "question": "what brand?", "image_id": "003a8ae2ef43b901", "answers": ["nokia"] * 10}]})
  [s] = benchmarks.read_textvqa(tmp_path, "val")
  assert s.id == "34602" and s.truth == ["nokia"] * 10
  assert s.image == str(tmp_path / "train_images" / "003a8ae2ef43b901.jpg")


def test_vizwiz_uses_its_own_prompt(tmp_path):
  write(tmp_path / "val.json", [{"image": "VizWiz_val_00000000.jpg", "question": "What is this?",
                                 "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10,
                                 "answer_type": "unanswerable", "answerable": 0}])
  [s] = benchmarks.read_vizwiz(tmp_path, "val")
  assert s.question == tasks.short_answer_prompt("What is this?", vizwiz=True)
  assert s.image == str(tmp_path / "val" / "VizWiz_val_00000000.jpg") and s.truth == ["unanswerable"] * 10


def test_pope_jsonl(tmp_path):
  lines = [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
            "label": "yes"},
           {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?",
            "label": "no"}]
  write(tmp_path / "coco_pope_random.json", "\n".join(json.dumps(x) for x in lines) + "\n")
  samples = benchmarks.read_pope(tmp_path, "random")
  assert [(s.id, s.truth) for s in samples] == [("1", "yes"), ("2", "no")]
  assert samples[0].question == "Is there a snowboard in the image?"  # POPE is asked as is
  write(tmp_path / "coco_pope_popular.json", json.dumps(lines[0]) + "\n{broken\n")
  with pytest.raises(SphinxError, match="line 2 is not JSON"):
    benchmarks.read_pope(tmp_path, "popular")


def test_mme_both_image_layouts(tmp_path):
  write(tmp_path / "existence.txt", "000000006040.jpg\tIs there a train? Please answer yes or no.\tYes\n"
                                    "000000006040.jpg\tIs there a bed? Please answer yes or no.\tNo\n")
  write(tmp_path / "existence" / "000000006040.jpg", png())
  write(tmp_path / "OCR.txt", "0001.jpg\tIs the word \"OPEN\"? Please answer yes or no.\tYes\n")
  write(tmp_path / "OCR" / "images" / "0001.jpg", png())
  samples = benchmarks.read_mme(tmp_path, "-")
  assert [s.truth["subtask"] for s in samples] == ["OCR", "existence", "existence"]
  assert samples[0].image == str(tmp_path / "OCR" / "images" / "0001.jpg")
  assert samples[1].image == str(tmp_path / "existence" / "000000006040.jpg")
  assert samples[2].truth == {"subtask": "existence", "image": "000000006040.jpg", "answer": "No"}
  assert samples[2].question == tasks.short_answer_prompt("Is there a bed? Please answer yes or no.")
  write(tmp_path / "count.txt", "only-an-image.jpg\n")
  with pytest.raises(SphinxError, match="count.txt line 1 has 1 tab-separated"):
    benchmarks.read_mme(tmp_path, "-")


def test_mmbench_tsv(tmp_path):
  image = base64.b64encode(png()).decode()
  header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\tl2-category\timage\n"
  rows = [f"5\tWhich animal?\tA zoo photo.\tcat\tdog\tnan\tnan\tB\tattribute\tperception\t{image}\n",
          f"1000005\tWhich animal?\tnan\tdog\tcat\tnan\tnan\tA\tattribute\tperception\t{image}\n"]
  write(tmp_path / "mmbench_dev_20230712.tsv", header + "".join(rows))
  a, b = benchmarks.read_mmbench(tmp_path, "dev_20230712")
  assert a.question == tasks.multiple_choice_prompt("Which animal?", ["cat", "dog"], context="A zoo photo.")
  assert b.question == tasks.multiple_choice_prompt("Which animal?", ["dog", "cat"])  # no hint: no Context
  assert a.truth == {"index": 5, "category": "attribute", "answer": "B"} and b.truth["index"] == 1_000_005
  assert a.image == png()
  write(tmp_path / "mmbench_bad.tsv", header + rows[0].replace(image, "%%%"))
  with pytest.raises(SphinxError, match="not base64"):
    benchmarks.read_mmbench(tmp_path, "bad")


def test_scienceqa_image_questions_of_the_split(tmp_path):
  write(tmp_path / "problems.json", {
      "7": {"question": "Which is a mammal?", "choices": ["frog", "whale", "trout"], "answer": 1,
            "hint": "Look closely.", "image": "image.png", "split": "test"},
      "8": {"question": "No image", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "test"},
      "9": {"question": "Other split", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
            "split": "train"}})
  [s] = benchmarks.read_scienceqa(tmp_path, "test")
  assert s.id == "7" and s.prefill == " The answer is"
  assert s.question == tasks.multiple_choice_prompt("Which is a mammal?", ["frog", "whale", "trout"],
                                                    context="Look closely.")
  assert s.truth == {"answer": "B", "letters": "ABC"}
  assert s.image == str(tmp_path / "images" / "test" / "7" / "image.png")


def test_refcoco_jsonl(tmp_path):
  line = {"image": "train2014/COCO_train2014_000000580957.jpg", "sent": "bowl behind the others", "width": 640,
          "height": 427, "bbox": [120.5, 10.0, 300.0, 200.0]}
  write(tmp_path / "refcoco_val.jsonl", json.dumps(line) + "\n")
  [s] = benchmarks.read_refcoco(tmp_path, "refcoco_val")
  assert s.question == tasks.rec_prompt("bowl behind the others")
  assert s.truth == {"box": [120.5, 10.0, 300.0, 200.0], "width": 640, "height": 427}
  assert s.image == str(tmp_path / "train2014" / "COCO_train2014_000000580957.jpg")
  write(tmp_path / "refcoco_bad.jsonl", json.dumps(dict(line, bbox=[1, 2, 3])) + "\n")
  with pytest.raises(SphinxError, match="bbox has 3 numbers"):
    benchmarks.read_refcoco(tmp_path, "refcoco_bad")


def test_missing_file_and_unknown_benchmark(tmp_path):
  with pytest.raises(SphinxError, match="testdev_balanced_questions.json not found"):
    benchmarks.read_gqa(tmp_path, "testdev_balanced")
  with pytest.raises(SphinxError, match="unknown benchmark 'vqa3'"):
    benchmarks.get("vqa3")
