"""`sphinx-jax prepare`: conversation JSON, COCO or VQAv2 data -> an ArrayRecord dataset with images inside.

Ours (the original reads JSON and image files directly). Output: a tensorflow-datasets ArrayRecord directory
(written without TensorFlow) that `sources.ArrayRecordSource` / `tfds.data_source` read by random access, so
Grain workers need neither the JSON nor the image folder. Features per record: id, task, conversations (JSON
text), image (the file's encoded bytes, b"" for text-only), text.

Records the readers reject (sources.BadRecord) and images that cannot be read or decoded are left out and
counted per reason; the command prints the counts. The directory appears only when complete (built in a
temporary sibling, then renamed).
"""
from __future__ import annotations

import collections
import functools
import io
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from sphinx_jax.data import sources
from sphinx_jax.errors import SphinxError

VERSION = "1.0.0"


def _image_bytes(record) -> bytes:
  """The record's image as encoded bytes, checked to decode; BadRecord("image_unreadable") otherwise."""
  if record.image is None:
    return b""
  if isinstance(record.image, bytes):
    data = record.image
  else:
    try:
      with open(record.image, "rb") as f:
        data = f.read()
    except OSError as error:
      raise sources.BadRecord("image_unreadable", record.id, f"cannot read {record.image} ({error})") from None
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()  # header and structure; cheap, unlike a full decode
  except Exception as error:  # PIL raises many types for broken files
    raise sources.BadRecord("image_unreadable", record.id, f"image does not decode ({error})") from None
  return data


def _examples(source, counts):
  """(key, features) for every good record of `source`; skipped ones are counted in `counts`."""
  for index in range(len(source)):
    try:
      record = source[index]
      image = _image_bytes(record)
    except sources.BadRecord as error:
      counts[error.reason] += 1
      continue
    counts["written"] += 1
    yield record.id, {"id": record.id, "task": record.task, "image": image, "text": record.text or "",
                      "conversations": json.dumps(list(record.conversations))}


@functools.lru_cache(maxsize=None)  # tfds registers builder classes by name: define it once per process
def _builder_class():
  import tensorflow_datasets as tfds  # heavy; only `prepare` and ArrayRecord readers import it

  class SphinxRecords(tfds.core.GeneratorBasedBuilder):
    """Records of one source; set `source` and `counts` on the instance before download_and_prepare()."""
    VERSION = tfds.core.Version(VERSION)
    source = None
    counts = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "id": tfds.features.Text(), "task": tfds.features.Text(), "conversations": tfds.features.Text(),
          "text": tfds.features.Text(), "image": tfds.features.Tensor(shape=(), dtype=np.object_)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      yield from _examples(self.source, self.counts)

  return SphinxRecords


def prepare(source, out_dir: str) -> dict:
  """Writes `source` (any sources.* reader) to `out_dir` as an ArrayRecord dataset. Returns the counts."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir):
    raise SphinxError(f"{out_dir}: already exists; prepare writes a new folder, pick another path.")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".prepare-", dir=parent)
  counts = collections.Counter()
  try:
    builder = _builder_class()(data_dir=tmp, file_format="array_record")
    builder.source, builder.counts = source, counts
    if len(source) == 0:
      raise SphinxError(f"{out_dir}: the input has no records; nothing to prepare.")
    try:
      builder.download_and_prepare()
    except AssertionError:  # tfds's way of saying the split came out empty
      if counts["written"]:
        raise
      raise SphinxError(f"{out_dir}: every record was rejected ({dict(counts)}); fix the input data.") from None
    os.rename(os.path.join(tmp, "sphinx_records", VERSION), out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return dict(counts)


def open_input(args):
  """The reader named by the command line."""
  name = args.name
  if args.kind == "conversations":
    return sources.ConversationSource(args.input, args.image_root, name=name)
  if args.kind == "coco":
    if not args.task:
      raise SphinxError(f"prepare --from coco needs --task, one of {sources.COCO_TASKS}.")
    return sources.CocoSource(args.input, args.image_root, args.task, refs=args.refs, name=name)
  if not args.annotations:
    raise SphinxError("prepare --from vqav2 needs --annotations (the VQAv2 annotations JSON).")
  return sources.Vqav2Source(args.input, args.annotations, args.image_root, name=name)


def run(args) -> int:
  counts = prepare(open_input(args), args.out)
  written = counts.pop("written", 0)
  print(f"prepared {written} records into {args.out}; skipped: {counts or 'none'}")
  return 0


def add_parser(subparsers) -> None:
  p = subparsers.add_parser("prepare", help="convert conversation JSON, COCO or VQAv2 data to ArrayRecord")
  p.add_argument("--from", dest="kind", required=True, choices=("conversations", "coco", "vqav2"))
  p.add_argument("--input", required=True, help="conversation .json/.jsonl, COCO annotations, VQAv2 questions")
  p.add_argument("--out", required=True, help="new output folder (read it with data kind 'arrayrecord')")
  p.add_argument("--image-root", default=None, help="folder that relative image paths start from")
  p.add_argument("--name", default="data", help="dataset name, the prefix of record ids")
  p.add_argument("--task", default=None, help=f"COCO: one of {sources.COCO_TASKS}")
  p.add_argument("--refs", default=None, help="COCO rec/reg: refcoco-like refs JSON")
  p.add_argument("--annotations", default=None, help="VQAv2: the annotations JSON")
  p.set_defaults(func=run)
