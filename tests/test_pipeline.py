"""The Grain mixture: ratios, determinism, restore from state (0 and 2 worker processes), disjoint process
shards, exact per-reason counts of bad data, the bad-fraction limit, packing."""
import json
import logging

import numpy as np
import pytest
from PIL import Image

import fixtures_text
from sphinx_jax import config as cfg
from sphinx_jax.data import pipeline, sources
from sphinx_jax.data.tokenizer import Tokenizer
from sphinx_jax.errors import SphinxError

SIZE = 8           # image side of these tests
IMAGE_WORDS = 16
MAX_LEN = 200
COLOURS = {"red": (250, 0, 0), "green": (0, 250, 0)}


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer(fixtures_text.train_spm())


def dialog(question, answer):
  return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_jsonl(path, items):
  path.write_text("\n".join(i if isinstance(i, str) else json.dumps(i) for i in items) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Two image datasets told apart by their image colour, a text corpus with numbered documents."""
  root = tmp_path_factory.mktemp("data")
  for name, rgb in COLOURS.items():
    Image.new("RGB", (6, 4), rgb).save(root / f"{name}.png")
    write_jsonl(root / f"{name}.jsonl", [{"image": f"{name}.png", "conversations": dialog(f"Colour {k}?", name)}
                                         for k in range(40)])
  (root / "text.txt").write_text("".join(f"The answer is document {k}.\n" for k in range(64)))
  return root


def data_config(root, **overrides):
  d = cfg.data_config(**{**dict(global_batch_size=8, max_len=MAX_LEN, num_workers=0, seed=3), **overrides})
  d.datasets.red = cfg.dataset_config("conversations", f"{root}/red.jsonl", ratio=0.5, image_root=str(root))
  d.datasets.green = cfg.dataset_config("conversations", f"{root}/green.jsonl", ratio=0.2, image_root=str(root))
  d.datasets.text = cfg.dataset_config("text", f"{root}/text.txt", ratio=0.3)
  return d


def make(d, tokenizer, shard=(0, 1)):
  return pipeline.make_iterator(d, tokenizer, image_size=SIZE, image_words=IMAGE_WORDS, shard_index=shard[0],
                                shard_count=shard[1])


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def row_source(batch, row):
  if "images" not in batch:  # text groups carry no pixels
    return "text"
  centre = tuple(batch["images"][row, SIZE // 2, SIZE // 2])
  return next(name for name, rgb in COLOURS.items() if centre == rgb)


def test_mixture_ratios_batch_groups_and_shapes(data_dir, tokenizer):
  it = make(data_config(data_dir), tokenizer)
  counts = {"red": 0, "green": 0, "text": 0}
  for _ in range(10_000 // 8):
    batch = next(it)
    # image groups: max_len - image_words text tokens (+ the image positions = max_len); text groups: max_len
    length = MAX_LEN - IMAGE_WORDS if "images" in batch else MAX_LEN
    assert batch["tokens"].shape == (8, length) and batch["tokens"].dtype == np.int32
    assert batch["loss_mask"].shape == (8, length) and batch["loss_mask"].dtype == bool
    if "images" in batch:
      assert batch["images"].shape == (8, SIZE, SIZE, 3) and batch["images"].dtype == np.uint8
      assert batch["has_image"].all()   # one group per batch
    for row in range(8):
      counts[row_source(batch, row)] += 1
  shares = {k: v / 10_000 for k, v in counts.items()}
  assert abs(shares["red"] - 0.5) <= 0.02 and abs(shares["green"] - 0.2) <= 0.02
  assert abs(shares["text"] - 0.3) <= 0.02


def test_same_seed_same_stream_other_seed_differs(data_dir, tokenizer):
  first = take(make(data_config(data_dir), tokenizer), 12)
  assert_same(first, take(make(data_config(data_dir), tokenizer), 12))
  other = take(make(data_config(data_dir, seed=4), tokenizer), 12)
  assert any(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))


def test_restore_from_saved_state_gives_the_same_batches(data_dir, tokenizer):
  d = data_config(data_dir)          # two groups: the group schedule resumes too
  it = make(d, tokenizer)
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))   # what a checkpoint stores
  expected = take(it, 6)
  restored = make(d, tokenizer)
  restored.set_state(state)
  assert_same(take(restored, 6), expected)


def documents_seen(batches, tokenizer):
  seen = []
  for batch in batches:
    for row in batch["tokens"]:
      seen.append(tokenizer.decode([t for t in row if t]))
  return seen


def test_process_shards_are_disjoint_and_cover_the_data(data_dir, tokenizer):
  d = cfg.data_config(global_batch_size=8, max_len=MAX_LEN, num_workers=0, epochs=1)
  d.datasets.text = cfg.dataset_config("text", f"{data_dir}/text.txt")
  shards = [documents_seen(list(make(d, tokenizer, shard=(p, 2))), tokenizer) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == 32
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == {f"The answer is document {k}." for k in range(64)}


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory):
  """200 conversation records (5% of each broken kind) and 100 pose records (5% bad boxes, 5% bad keypoints)."""
  root = tmp_path_factory.mktemp("broken")
  Image.new("RGB", (6, 4), (9, 9, 9)).save(root / "ok.png")
  (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
  items = []
  for k in range(200):
    item = {"image": "ok.png", "conversations": dialog(f"Question {k}?", f"Answer {k}.")}
    kind = k % 20
    if kind == 0:
      item = "{broken json"
    elif kind == 1:
      item["image"] = "missing.png"
    elif kind == 2:
      item["image"] = "corrupt.png"
    elif kind == 3:
      item["conversations"] = item["conversations"][:1]
    elif kind == 4:   # the reply starts after the text budget: nothing left to learn after truncation
      item["conversations"] = dialog("many words " * 200, "late answer")
    elif kind == 5:
      item["conversations"] = [{"from": "human"}]
    items.append(item)
  write_jsonl(root / "dialogs.jsonl", items)
  people, annotations = [], []
  for k in range(100):
    people.append({"id": k, "file_name": "ok.png", "width": 60, "height": 40})
    box = [10, 10, 20, 15]                 # x, y, w, h inside the 60x40 image
    if k % 20 == 0:
      box = [50, 10, 20, 15]               # runs past the right edge
    keypoints = [0] * 51
    keypoints[0:3] = [15, 15, 2]
    if k % 20 == 1:
      keypoints[0:3] = [40, 30, 2]         # the nose outside the person's box
    annotations.append({"id": k + 1, "image_id": k, "category_id": 1, "bbox": box, "keypoints": keypoints,
                        "num_keypoints": 1})
  (root / "pose.json").write_text(json.dumps({"images": people, "annotations": annotations,
                                              "categories": [{"id": 1, "name": "person"}]}))
  return root


EXPECTED_BAD = {"malformed_json": 10, "image_unreadable": 20, "no_assistant_turn": 10, "too_long": 10,
                "malformed_record": 10, "bad_box": 5, "bad_keypoints": 5}


def broken_config(root, **overrides):
  d = cfg.data_config(global_batch_size=8, max_len=MAX_LEN, epochs=1, seed=1, **overrides)
  d.datasets.dialogs = cfg.dataset_config("conversations", f"{root}/dialogs.jsonl", image_root=str(root))
  d.datasets.pose = cfg.dataset_config("coco", f"{root}/pose.json", ratio=0.5, image_root=str(root), task="pose")
  return d


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_records_counted_exactly_and_restore_mid_stream(broken_dir, tokenizer, workers, caplog):
  """One epoch to the end: exact counts per reason, also when resumed from a state saved after 5 batches
  (counts made in worker processes travel with the batches into the state)."""
  d = broken_config(broken_dir, num_workers=workers)
  it = make(d, tokenizer)
  with caplog.at_level(logging.WARNING, logger="sphinx_jax.data.pipeline"):
    head = take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    tail = list(it)
  it.close()
  final = it.get_state()
  assert final["bad"] == EXPECTED_BAD
  assert final["records"] == 300 - sum(EXPECTED_BAD.values())
  assert sum(int(b["loss_mask"].any(axis=1).sum()) for b in head + tail) == final["records"]
  warned = [r.getMessage() for r in caplog.records]
  assert len(warned) == len(EXPECTED_BAD)    # once per reason, naming a record
  for reason in EXPECTED_BAD:
    [message] = [m for m in warned if f"({reason})" in m]
    assert "first: dialogs:" in message or "first: pose:" in message
  restored = make(d, tokenizer)
  restored.set_state(state)
  assert_same(list(restored), tail)
  restored.close()
  assert restored.get_state()["bad"] == EXPECTED_BAD and restored.get_state()["records"] == final["records"]


def test_bad_fraction_limit_stops_the_stream(broken_dir, tokenizer):
  d = broken_config(broken_dir, num_workers=0, max_bad_fraction=0.1, bad_fraction_min_records=50)
  it = make(d, tokenizer)
  with pytest.raises(SphinxError, match=r"records were bad .* more than data.max_bad_fraction=0.1"):
    list(it)


def test_a_stream_of_only_bad_records_stops_in_the_worker(tmp_path, tokenizer):
  write_jsonl(tmp_path / "bad.jsonl", ["{nope"] * 30)
  d = cfg.data_config(global_batch_size=4, max_len=MAX_LEN, num_workers=0, bad_fraction_min_records=20)
  d.datasets.bad = cfg.dataset_config("conversations", str(tmp_path / "bad.jsonl"))
  with pytest.raises(SphinxError, match=r"malformed_json"):
    next(make(d, tokenizer))


def test_packed_text_rows_and_restore(data_dir, tokenizer):
  d = cfg.data_config(global_batch_size=4, max_len=48, num_workers=0, pack_text=True)
  d.datasets.text = cfg.dataset_config("text", f"{data_dir}/text.txt")
  it = make(d, tokenizer)
  first = take(it, 3)
  for batch in first:
    assert batch["segment_ids"].shape == (4, 48) and batch["positions"].shape == (4, 48)
    assert batch["segment_ids"].max() >= 2                               # several documents per row
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    np.testing.assert_array_equal(batch["tokens"][starts], tokenizer.bos_id)  # each segment starts with BOS
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 4)
  restored = make(d, tokenizer)
  restored.set_state(state)
  assert_same(take(restored, 4), expected)


def test_config_errors_name_the_field(data_dir, tokenizer):
  d = data_config(data_dir, global_batch_size=9)
  with pytest.raises(SphinxError, match="global_batch_size=9 does not split over 2 processes"):
    make(d, tokenizer, shard=(0, 2))
  d = data_config(data_dir)
  d.datasets.red.kind = "parquet"
  with pytest.raises(SphinxError, match="datasets.red.kind: unknown kind 'parquet'"):
    make(d, tokenizer)


def test_group_schedule_shares_are_exact_per_block():
  order = pipeline.group_schedule([0.7, 0.2, 0.1], seed=0, block=5)
  assert len(order) == pipeline.GROUP_BLOCK
  assert [order.count(g) for g in range(3)] == [70, 20, 10]
  assert order != pipeline.group_schedule([0.7, 0.2, 0.1], seed=0, block=6)   # shuffled per block
  assert set(EXPECTED_BAD) <= set(sources.REASONS)   # every reason counted here is a declared one
