"""The synthetic world: deterministic by seed, ground truth consistent with the pixels, and writers whose
files read back to the same ground truth."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from sphinx_jax import config as cfg
from sphinx_jax.data import shapes, sources, tasks
from sphinx_jax.errors import SphinxError


def pixels(img):
  return np.asarray(img, np.int32)


def test_same_seed_same_samples():
  a, b = shapes.World(seed=5), shapes.World(seed=5)
  for task in shapes.WORLD_TASKS:
    for index in (0, 17):
      img_a, rec_a, truth_a = a.sample(index, task)
      img_b, rec_b, truth_b = b.sample(index, task)
      assert img_a.tobytes() == img_b.tobytes() and rec_a == rec_b
      assert repr(truth_a) == repr(truth_b)
  # random access: asking in another order gives the same sample
  assert a.sample(17, "vqa")[1] == shapes.World(seed=5).sample(17, "vqa")[1]


def test_indices_seeds_and_domains_differ():
  world = shapes.World(seed=5)
  for task in ("rec", "pose", "layout"):
    images = {world.sample(i, task)[0].tobytes() for i in range(6)}
    assert len(images) == 6
    assert shapes.World(seed=6).sample(0, task)[0].tobytes() != world.sample(0, task)[0].tobytes()
  flat, flat_rec, flat_truth = world.sample(3, "grounded_caption")
  tex, tex_rec, tex_truth = shapes.World(seed=5, domain="textured").sample(3, "grounded_caption")
  assert flat_truth["objects"] == tex_truth["objects"] and flat_rec.conversations == tex_rec.conversations
  assert np.abs(pixels(flat) - pixels(tex)).mean() > 3


def test_record_carries_the_image():
  img, record, _ = shapes.World(seed=1).sample(2, "detection")
  assert record.task == "detection" and record.id == "shapes/1/flat/detection/2"
  assert Image.open(io.BytesIO(record.image)).convert("RGB").tobytes() == img.tobytes()
  assert [t["from"] for t in record.conversations] == ["human", "gpt"]


@pytest.mark.parametrize("domain, tol", [("flat", 0), ("textured", 45)])
def test_shapes_match_pixels(domain, tol):
  world = shapes.World(seed=3, domain=domain)
  for i in range(12):
    img, _, truth = world.sample(i, "detection")
    px = pixels(img)
    for o in truth["objects"]:
      cx, cy = (int(v) for v in o.centre)
      assert np.abs(px[cy, cx] - shapes.COLORS[o.color]).max() <= tol, (i, o)
      if domain == "flat":
        # the box is tight: the shape's colour fills exactly the box's extent (other shapes are >= 4 px away)
        x1, y1, x2, y2 = o.box
        window = px[max(y1 - 2, 0):y2 + 2, max(x1 - 2, 0):x2 + 2]
        ys, xs = np.nonzero((window == shapes.COLORS[o.color]).all(-1))
        assert (xs.min() + max(x1 - 2, 0), ys.min() + max(y1 - 2, 0), xs.max() + max(x1 - 2, 0) + 1,
                ys.max() + max(y1 - 2, 0) + 1) == o.box, (i, o)


def test_vqa_answers_follow_the_scene():
  world = shapes.World(seed=4)
  for i in range(30):
    _, _, truth = world.sample(i, "vqa")
    objects, q, a = truth["objects"], truth["question"], truth["answer"]
    if q.startswith("How many"):
      plural = q.split()[2]
      assert a == str(sum(shapes.PLURAL[o.shape] == plural for o in objects))
    elif q.startswith("What color"):
      shape = q.split()[-1].rstrip("?")
      assert [o.color for o in objects if o.shape == shape] == [a]
    elif q.startswith("What shape"):
      color = q.split()[4]
      assert [o.shape for o in objects if o.color == color] == [a]
    else:
      names = q[len("Is the "):-1].split(" to the left of the ")
      first, second = (next(o for o in objects if o.name == n) for n in names)
      assert a == ("yes" if first.centre[0] < second.centre[0] else "no")


def test_people_match_pixels():
  world = shapes.World(seed=2)
  seen_hidden = False
  for i in range(20):
    img, _, truth = world.sample(i, "pose")
    px = pixels(img)
    for p in truth["objects"]:
      x1, y1, x2, y2 = p.box
      assert 0 <= x1 < x2 <= img.width and 0 <= y1 < y2 <= img.height
      for k, (x, y, v) in enumerate(p.keypoints):
        assert x1 <= x < x2 and y1 <= y < y2, (i, tasks.KEYPOINTS[k])
        colour = shapes.COLORS[p.color] if v == 2 else shapes.OCCLUDER
        if k >= 5:  # body joints are drawn as dots in the figure's colour, or hidden behind the occluder
          assert tuple(px[int(y), int(x)]) == colour, (i, tasks.KEYPOINTS[k], v)
      seen_hidden |= bool((p.keypoints[:, 2] == 1).any())
  assert seen_hidden


def test_document_blocks_match_pixels():
  world = shapes.World(seed=9)
  for i in range(10):
    img, _, truth = world.sample(i, "layout")
    px = pixels(img)
    w, h = truth["size"]
    assert h > w
    ink = (px != shapes.PAPER).any(-1)
    covered = np.zeros_like(ink)
    for cls, (x1, y1, x2, y2) in truth["blocks"]:
      assert cls in tasks.LAYOUT_CLASSES
      ys, xs = np.nonzero(ink[y1:y2, x1:x2])
      assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x2 - x1, y2 - y1), (i, cls)
      assert not covered[y1:y2, x1:x2].any()  # blocks do not overlap
      covered[y1:y2, x1:x2] = True
    assert not (ink & ~covered).any()  # no ink outside the blocks


def test_object_sides_bound_each_shape():
  for sides in ((0.14, 0.3), (0.3, 0.45)):
    world = shapes.World(seed=4, max_objects=3, object_sides=sides)
    for i in range(20):
      _, (w, h), objects = world.scene(i, "shapes")
      assert objects
      for o in objects:
        side = o.box[2] - o.box[0]
        assert int(sides[0] * min(w, h)) <= side <= int(sides[1] * min(w, h)), (sides, i, o)
  default = shapes.World(seed=4, max_objects=3).sample(3, "rec")
  assert default[1] == shapes.World(seed=4, max_objects=3, object_sides=shapes.OBJECT_SIDES).sample(3, "rec")[1]


def test_synthetic_source_passes_object_sides():
  config = cfg.dataset_config("synthetic", "", task="rec", seed=2, max_objects=2, object_sides=(0.35, 0.4))
  record = sources.open_source("rec", config)[5]
  _, expected, _ = shapes.World(seed=2, max_objects=2, object_sides=(0.35, 0.4)).sample(5, "rec")
  assert record == expected


def test_bad_arguments():
  with pytest.raises(SphinxError, match="unknown domain 'noisy'"):
    shapes.World(domain="noisy")
  with pytest.raises(SphinxError, match=r"object_sides=\(0.5, 0.2\)"):
    shapes.World(object_sides=(0.5, 0.2))
  with pytest.raises(SphinxError, match="no task 'ocr'"):
    shapes.World().sample(0, "ocr")


def test_writers_round_trip(tmp_path):
  world = shapes.World(seed=8)
  out = shapes.write_accessory(world, [(i, t) for i in range(2) for t in shapes.WORLD_TASKS], tmp_path / "acc")
  lines = [json.loads(line) for line in open(os.path.join(out, "conversations.jsonl"))]
  assert len(lines) == 2 * len(shapes.WORLD_TASKS)
  for entry in lines:
    img, record, _ = world.sample(int(entry["id"].split("/")[-1]), entry["task"])
    assert entry["conversations"] == list(record.conversations) and entry["id"] == record.id
    assert Image.open(os.path.join(out, entry["image"])).tobytes() == img.tobytes()

  coco = shapes.write_coco(world, 3, tmp_path / "coco")
  inst = json.load(open(os.path.join(coco, "instances.json")))
  refs = json.load(open(os.path.join(coco, "refs.json")))
  anns = {a["id"]: a for a in inst["annotations"]}
  cats = {c["id"]: c["name"] for c in inst["categories"]}
  for ref in refs:
    ann = anns[ref["ann_id"]]
    _, _, truth = world.sample(ref["image_id"], "rec")
    obj = next(o for o in truth["objects"] if o.name == ref["sentences"][0]["sent"])
    assert cats[ann["category_id"]] == obj.shape and ann["color"] == obj.color
    x, y, bw, bh = ann["bbox"]
    assert (x, y, x + bw, y + bh) == obj.box
  assert len(refs) == sum(len(world.scene(i, "shapes")[2]) for i in range(3))
  kp = json.load(open(os.path.join(coco, "person_keypoints.json")))
  assert kp["categories"][0]["keypoints"] == list(tasks.KEYPOINTS)
  first = kp["annotations"][0]
  person = world.sample(first["image_id"], "pose")[2]["objects"][0]
  np.testing.assert_allclose(np.reshape(first["keypoints"], (17, 3)), person.keypoints, atol=0.005)
  layout = json.load(open(os.path.join(coco, "layout.json")))
  assert {c["name"]: c["id"] for c in layout["categories"]} == {"text": 1, "title": 2, "list": 3, "table": 4,
                                                                  "figure": 5}
  image = layout["images"][0]
  assert Image.open(os.path.join(coco, "images", image["file_name"])).size == (image["width"], image["height"])

  vqa = shapes.write_vqav2(world, 4, tmp_path / "vqa")
  questions = json.load(open(os.path.join(vqa, "questions.json")))["questions"]
  annotations = json.load(open(os.path.join(vqa, "annotations.json")))["annotations"]
  for q, a in zip(questions, annotations):
    truth = world.sample(q["image_id"], "vqa")[2]
    assert q["question"] == truth["question"] and a["multiple_choice_answer"] == truth["answer"]
    assert len(a["answers"]) == 10 and a["question_id"] == q["question_id"]
    assert os.path.isfile(os.path.join(vqa, "images", f"COCO_shapes2026_{q['image_id']:012d}.jpg"))


def test_writers_leave_nothing_partial(tmp_path):
  world = shapes.World(seed=8)
  with pytest.raises(SphinxError, match="no task 'ocr'"):
    shapes.write_accessory(world, [(0, "vqa"), (1, "ocr")], tmp_path / "acc")
  assert os.listdir(tmp_path) == []
  (tmp_path / "taken").mkdir()
  with pytest.raises(SphinxError, match="taken: already exists"):
    shapes.write_vqav2(world, 1, tmp_path / "taken")


def test_world_source_random_access():
  world = shapes.World(seed=4)
  source = shapes.WorldSource(world, ("rec", "pose"), length=6)
  assert len(source) == 6
  assert source[5] == world.sample(2, "pose")[1] and source[2] == world.sample(1, "rec")[1]
  with pytest.raises(IndexError):
    source[6]
  with pytest.raises(SphinxError, match="tasks \\['ocr'\\]"):
    shapes.WorldSource(world, ("ocr",))


def test_multi_turn_samples_extend_the_single_turn_one():
  world = shapes.World(seed=4)
  for i in range(12):
    for task in ("vqa", "rec", "reg"):
      _, one, truth1 = world.sample(i, task)
      img, many, truth = world.sample(i, task, turns=4)
      turns = many.conversations
      assert turns[:2] == one.conversations and many.image == one.image
      questions = [t["value"] for t in turns[0::2]]
      assert len(questions) == len(set(questions)) == len(truth["turns"]) <= 4
      assert all(t["from"] == "gpt" for t in turns[1::2])
      if task == "vqa":  # every further answer is the scene's truth for its question
        assert [t["answer"] for t in truth["turns"]] == [t["value"] for t in turns[1::2]]
      else:  # distinct objects, each at most once
        names = [t["expression"] for t in truth["turns"]]
        assert len(names) == len(set(names)) and len(names) == min(4, len(truth["objects"]))
  with pytest.raises(SphinxError, match="turns=0"):
    world.sample(0, "vqa", turns=0)
  source = shapes.WorldSource(world, ("vqa",), length=3, turns=3)
  assert source[1] == world.sample(1, "vqa", turns=3)[1]


def test_a_scene_as_text_names_every_shape_of_the_drawn_scene_with_its_box():
  world = shapes.World(seed=6, max_objects=3, object_sides=(0.25, 0.45))
  orders = set()
  for i in range(20):
    img, drawn, truth = world.sample(i, "rec", turns=3)
    none, described, text_truth = world.sample(i, "rec", turns=3, as_text=True)
    assert none is None and described.image is None and drawn.image is not None
    assert text_truth["objects"] == truth["objects"]
    first, rest = described.conversations[0]["value"].split("\n", 1)
    assert rest == drawn.conversations[0]["value"] and described.conversations[1:] == drawn.conversations[1:]
    frame = tasks.Frame(*truth["size"])
    found = [(name, box) for name, boxes in tasks.phrases(first) for box in boxes]
    printed = [(o.name, tasks.all_boxes(tasks.encode(frame, [o.box]))[0]) for o in truth["objects"]]
    assert first.startswith("There is ") and sorted(found) == sorted(printed)
    orders.add([name for name, _ in found] == [name for name, _ in printed])
  assert orders == {True, False}  # the order is drawn, not the scene's
  source = sources.open_source("t", cfg.dataset_config("synthetic", "", task="vqa", seed=6, as_text=True))
  assert source[4] == shapes.World(seed=6).sample(4, "vqa", as_text=True)[1]
  with pytest.raises(SphinxError, match="as_text describes shapes scenes only; task 'pose'"):
    world.sample(0, "pose", as_text=True)
  with pytest.raises(SphinxError, match=r"datasets\.chat\.as_text: only the synthetic world"):
    sources.open_source("chat", cfg.dataset_config("conversations", "chat.jsonl", as_text=True))
