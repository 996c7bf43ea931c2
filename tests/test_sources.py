"""The readers give back the records E1's synthetic world wrote (conversation JSON, COCO, VQAv2, and the
ArrayRecord set `prepare` makes of them), and reject each kind of broken record with its reason and id."""
import json

import numpy as np
import pytest

from sphinx_jax import cli, config as cfg
from sphinx_jax.data import image as image_lib, prepare, shapes, sources, tasks
from sphinx_jax.errors import SphinxError

SCENES = 10


@pytest.fixture(scope="module")
def world():
  return shapes.World(seed=7)


@pytest.fixture(scope="module")
def written(world, tmp_path_factory):
  root = tmp_path_factory.mktemp("world")
  items = [(i, t) for i in range(4) for t in shapes.WORLD_TASKS]
  return {
      "items": items,
      "accessory": shapes.write_accessory(world, items, root / "accessory"),
      "accessory_json": shapes.write_accessory(world, items[:8], root / "accessory_json", fmt="json"),
      "coco": shapes.write_coco(world, SCENES, root / "coco"),
      "vqav2": shapes.write_vqav2(world, SCENES, root / "vqav2"),
      "root": root,
  }


def pixels(source):
  return np.asarray(image_lib.load_rgb(source))


def test_conversation_jsonl_and_json_give_the_world_records(world, written):
  for key, fmt, items in (("accessory", "jsonl", written["items"]), ("accessory_json", "json",
                                                                      written["items"][:8])):
    src = sources.ConversationSource(f"{written[key]}/conversations.{fmt}", written[key], name="acc")
    assert len(src) == len(items)
    for k, (index, task) in enumerate(items):
      record = src[k]
      expected = world.sample(index, task)[1]
      assert record.id == f"acc:{k}" and record.task == task
      assert record.conversations == expected.conversations
      np.testing.assert_array_equal(pixels(record.image), pixels(expected.image))


def by_image(world, task):
  return {i: world.sample(i, task) for i in range(SCENES)}


def test_coco_detection_matches_the_world(world, written):
  src = sources.CocoSource(f"{written['coco']}/instances.json", f"{written['coco']}/images", "detection", name="det")
  records = {r.id: r for r in (src[k] for k in range(len(src)))}
  checked = 0
  for i, (_, expected, truth) in by_image(world, "detection").items():
    category = shapes.SHAPES.index(truth["class"]) + 1
    if not truth["boxes"]:
      assert f"det:{i}:{category}" not in records   # no record for a class absent from the scene
      continue
    record = records[f"det:{i}:{category}"]
    assert record.conversations == expected.conversations and record.task == "detection"
    np.testing.assert_array_equal(pixels(record.image), pixels(expected.image))
    checked += 1
  assert checked >= 3
  # every object of every scene is in exactly one detection answer
  total = sum(len(tasks.phrases(r.conversations[1]["value"])[0][1]) for r in records.values())
  assert total == sum(len(world.scene(i, "shapes")[2]) for i in range(SCENES))


@pytest.mark.parametrize("task", ["rec", "reg"])
def test_coco_refs_match_the_world(world, written, task):
  coco = written["coco"]
  src = sources.CocoSource(f"{coco}/instances.json", f"{coco}/images", task, refs=f"{coco}/refs.json")
  records = [src[k] for k in range(len(src))]
  for i, (_, expected, truth) in by_image(world, task).items():
    # the world's question about one object of scene i is among our records of that scene
    [record] = [r for r in records if r.id.startswith(f"coco:{i}:") and r.conversations == expected.conversations]
    assert record.task == task
    np.testing.assert_array_equal(pixels(record.image), pixels(expected.image))
  assert len(records) == sum(len(world.scene(i, "shapes")[2]) for i in range(SCENES))


def test_coco_pose_and_layout_match_the_world(world, written):
  coco = written["coco"]
  pose = sources.CocoSource(f"{coco}/person_keypoints.json", f"{coco}/images", "pose")
  records = [pose[k] for k in range(len(pose))]
  for i, (_, expected, truth) in by_image(world, "pose").items():
    frame = tasks.Frame(*truth["size"])
    prompt = tasks.pose_prompt(frame.normalise(truth["box"]))
    [record] = [r for r in records if r.conversations[0]["value"] == prompt and r.id.startswith(f"coco:{i}:")]
    ours, theirs = (tasks.keypoints(c[1]["value"]) for c in (record.conversations, expected.conversations))
    assert ours.keys() == theirs.keys() and ours
    # the COCO file stores keypoints rounded to 0.01 px, which can move a two-decimal value by one step
    np.testing.assert_allclose([ours[k] for k in ours], [theirs[k] for k in ours], atol=0.0101)
  layout = sources.CocoSource(f"{coco}/layout.json", f"{coco}/images", "layout")
  assert len(layout) == SCENES
  for i, (_, expected, _) in by_image(world, "layout").items():
    record = layout[i]
    assert record.id == f"coco:{i}" and record.conversations == expected.conversations
    np.testing.assert_array_equal(pixels(record.image), pixels(expected.image))


def test_vqav2_matches_the_world(world, written):
  root = written["vqav2"]
  src = sources.Vqav2Source(f"{root}/questions.json", f"{root}/annotations.json", f"{root}/images")
  assert len(src) == SCENES
  for i, (_, expected, _) in by_image(world, "vqa").items():
    record = src[i]
    assert record.id == f"vqav2:{i}" and record.task == "vqa"
    assert record.conversations == expected.conversations
    assert record.image.endswith(f"COCO_{shapes.VQA_SUBTYPE}_{i:012d}.jpg")


def test_vqav2_target_is_the_most_common_answer():
  answers = [{"answer": a} for a in ["two", "2", "2", "two", "2", "3"]]
  assert sources.most_common_answer(answers) == "2"
  assert sources.most_common_answer([{"answer": "no"}, {"answer": "yes"}]) == "no"  # tie: the first given


def test_prepare_cli_round_trips_through_array_record(world, written, capsys):
  acc = written["accessory"]
  out = written["root"] / "prepared"
  assert cli.main(["prepare", "--from", "conversations", "--input", f"{acc}/conversations.jsonl",
                   "--image-root", str(acc), "--name", "acc", "--out", str(out)]) == 0
  assert f"prepared {len(written['items'])} records" in capsys.readouterr().out
  original = sources.ConversationSource(f"{acc}/conversations.jsonl", str(acc), name="acc")
  expected = {r.id: r for r in (original[k] for k in range(len(original)))}
  prepared = sources.open_source("ignored", cfg.dataset_config("arrayrecord", str(out)))
  assert len(prepared) == len(expected)
  for k in range(len(prepared)):
    record = prepared[k]
    source = expected[record.id]
    assert (record.task, record.conversations, record.text) == (source.task, source.conversations, None)
    with open(source.image, "rb") as f:
      assert record.image == f.read()   # the file's encoded bytes, stored as they were
  # bad command lines end with one line on stderr and exit code 2, leaving nothing behind
  assert cli.main(["prepare", "--from", "coco", "--input", f"{written['coco']}/instances.json",
                   "--out", str(out) + "_coco"]) == 2
  assert "needs --task" in capsys.readouterr().err
  assert cli.main(["prepare", "--from", "conversations", "--input", f"{acc}/conversations.jsonl",
                   "--out", str(out)]) == 2
  assert "already exists" in capsys.readouterr().err


def test_prepare_vqav2_and_coco(written, tmp_path):
  root, coco = written["vqav2"], written["coco"]
  counts = prepare.prepare(sources.Vqav2Source(f"{root}/questions.json", f"{root}/annotations.json",
                                               f"{root}/images"), str(tmp_path / "vqa"))
  assert counts == {"written": SCENES}
  src = sources.CocoSource(f"{coco}/instances.json", f"{coco}/images", "rec", refs=f"{coco}/refs.json")
  prepare.prepare(src, str(tmp_path / "rec"))
  ids = {sources.ArrayRecordSource(str(tmp_path / "rec"))[k].id for k in range(len(src))}
  assert ids == {src[k].id for k in range(len(src))}


def test_prepare_skips_and_counts_bad_records_and_leaves_nothing_on_failure(tmp_path):
  good = {"image": "a.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
  from PIL import Image
  Image.new("RGB", (4, 3), (1, 2, 3)).save(tmp_path / "a.png")
  (tmp_path / "broken.png").write_bytes(b"\x89PNG nope")
  lines = [json.dumps(good), "{not json", json.dumps({**good, "image": "missing.png"}),
           json.dumps({**good, "image": "broken.png"}), json.dumps(good)]
  (tmp_path / "data.jsonl").write_text("\n".join(lines))
  counts = prepare.prepare(sources.ConversationSource(str(tmp_path / "data.jsonl"), str(tmp_path)),
                           str(tmp_path / "out"))
  assert counts == {"written": 2, "malformed_json": 1, "image_unreadable": 2}
  (tmp_path / "bad.jsonl").write_text("{not json\n")
  with pytest.raises(SphinxError, match="every record was rejected"):
    prepare.prepare(sources.ConversationSource(str(tmp_path / "bad.jsonl")), str(tmp_path / "out2"))
  assert not (tmp_path / "out2").exists()
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".prepare")) == []


# --------------------------------------------------------------------------------------- broken records
def coco_file(tmp_path, anns, images=None):
  coco = {"images": images or [{"id": 1, "file_name": "x.png", "width": 100, "height": 50}],
          "categories": [{"id": 1, "name": "person"}], "annotations": anns}
  path = tmp_path / "coco.json"
  path.write_text(json.dumps(coco))
  return str(path)


def reasons(src):
  out = []
  for k in range(len(src)):
    try:
      src[k]
      out.append(None)
    except sources.BadRecord as error:
      out.append((error.reason, error.record_id))
  return out


def test_coco_bad_boxes_and_keypoints_are_rejected_with_reason_and_id(tmp_path):
  kp_ok = [0] * 51
  kp_ok[0:3] = [20, 20, 2]
  kp_off = list(kp_ok)
  kp_off[3:6] = [90, 45, 2]  # left eye far outside the person's box
  anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "keypoints": kp_ok},
          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "keypoints": kp_off},
          {"id": 3, "image_id": 1, "category_id": 1, "bbox": [80, 10, 30, 30], "keypoints": kp_ok},   # x2 = 110
          {"id": 4, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 30], "keypoints": kp_ok}]    # degenerate
  src = sources.CocoSource(coco_file(tmp_path, anns), None, "pose", name="p")
  assert reasons(src) == [None, ("bad_keypoints", "p:1:2"), ("bad_box", "p:1:3"), ("bad_box", "p:1:4")]
  det = sources.CocoSource(coco_file(tmp_path, anns), None, "detection", name="d")
  assert reasons(det) == [("bad_box", "d:1:1")]  # one bad box spoils the image's detection record


def test_conversation_and_vqa_bad_records(tmp_path):
  lines = [
      '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}',
      '{"conversations": [{"from": "human", "value": "q"}]',
      '{"conversations": [{"from": "human", "value": "only a question"}]}',
      '{"conversations": "not a list"}',
      '{"image": 3, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}',
  ]
  (tmp_path / "c.jsonl").write_text("\n".join(lines))
  src = sources.ConversationSource(str(tmp_path / "c.jsonl"), name="c")
  assert reasons(src) == [None, ("malformed_json", "c:1"), ("no_assistant_turn", "c:2"),
                          ("malformed_record", "c:3"), ("malformed_record", "c:4")]
  (tmp_path / "q.json").write_text(json.dumps({"questions": [{"image_id": 1, "question": "?", "question_id": 5},
                                                             {"image_id": 1, "question_id": 6}]}))
  (tmp_path / "a.json").write_text(json.dumps({"annotations": []}))
  vqa = sources.Vqav2Source(str(tmp_path / "q.json"), str(tmp_path / "a.json"), None, name="v")
  assert reasons(vqa) == [("no_assistant_turn", "v:5"), ("malformed_record", "v:6")]


def test_file_level_problems_raise_one_clear_error(tmp_path):
  with pytest.raises(SphinxError, match="nowhere.jsonl: file not found"):
    sources.ConversationSource(str(tmp_path / "nowhere.jsonl"))
  (tmp_path / "bad.json").write_text("[{")
  with pytest.raises(SphinxError, match="bad.json: not valid JSON"):
    sources.ConversationSource(str(tmp_path / "bad.json"))
  (tmp_path / "x.json").write_text(json.dumps({"images": []}))
  with pytest.raises(SphinxError, match="x.json: not a COCO annotation file"):
    sources.CocoSource(str(tmp_path / "x.json"), None, "detection")
  with pytest.raises(SphinxError, match="needs a refs file"):
    sources.CocoSource(str(tmp_path / "x.json"), None, "rec")
  with pytest.raises(SphinxError, match="not a prepared dataset"):
    sources.ArrayRecordSource(str(tmp_path))


def test_text_source_by_line_and_by_file(tmp_path):
  (tmp_path / "corpus.txt").write_text("first document\n\nsecond one\n")
  lines = sources.TextSource(str(tmp_path / "corpus.txt"), name="t")
  assert [(r.id, r.text, r.task) for r in (lines[0], lines[1])] == [("t:0", "first document", "text"),
                                                                     ("t:1", "second one", "text")]
  folder = tmp_path / "docs"
  folder.mkdir()
  (folder / "b.txt").write_text("bee\nline two")
  (folder / "a.txt").write_text("ay")
  docs = sources.TextSource(str(folder), name="d")
  assert [(docs[k].id, docs[k].text) for k in range(2)] == [("d:a.txt", "ay"), ("d:b.txt", "bee\nline two")]
