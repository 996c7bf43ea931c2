"""Training input: a Grain mixture of named datasets -> fixed-shape batches, sharded by process, resumable.

Mirrors LLaMA2-Accessory's finetuning data path (`FinetuneDialogDataset` + `FinetuneDistSampler`, SPHINX.md §6):
datasets with ratios, each global batch drawn from one group (image-text vs text-only), text tokenised with the
conv_v1_2 template and truncated to `max_len - image_words`, images padded-resized (data/image.py).

Per group, per process (`shard_index` of `shard_count`, by default the JAX process):
  each dataset: its records -> shuffle(seed) -> repeat (reshuffled per epoch) -> grain mix by ratio (exact
  interleave): one global stream, the same on every process; this process takes its rows of every global batch
  (`process_rows`) -> read + decode + padded resize + tokenise on `read_threads` threads, `prefetch` batches
  of rows ahead                                                                       (worker processes)
  -> batches of good samples; skipped records counted per reason inside the batch    (worker processes)
  -> mp_prefetch. The main process picks the group of batch n from a seeded schedule with exact group shares
  per block of GROUP_BLOCK batches, the same on every process, so a global batch never mixes groups.

Batch (per process, B = global_batch_size / shard_count, L = max_len, M = image_words, S = model.image_size):
  image groups: tokens int32[B, L - M], loss_mask bool[B, L - M] (True where token i is a target), images
  uint8[B, S, S, 3] (normalise on device with data.image.normalize), has_image bool[B] — with the M image
  positions the decoder sees L; text groups: tokens and loss_mask [B, L], and with `pack_text` also
  segment_ids int32[B, L] (0 = padding) and positions int32[B, L]. Each group has one static shape.

Bad data: skipped, counted exactly per reason (counts travel with the batches out of the workers and live in
the iterator state), logged once per reason with the record id; past `max_bad_fraction` of the records seen
(after `bad_fraction_min_records`), a SphinxError stops the run. `get_state()` is JSON-serialisable; a state
restores only into a pipeline with the same datasets, seed, batch size and `num_workers` (Grain's worker
slicing changes the order otherwise).

Processes: each group runs its own `num_workers` worker processes. `epochs=None` repeats forever (training);
with `epochs` set the stream ends when a group's mixture runs out (Grain's mix stops at its first exhausted
dataset), the last batch padded with empty rows (no targets, no image).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import threading
import time
import zlib

import grain
import jax
import numpy as np

from sphinx_jax.data import conversation, image as image_lib, sources as sources_lib
from sphinx_jax.errors import SphinxError

GROUP_BLOCK = 100  # batches per block of the group schedule: group shares are exact within each block
GROUPS = ("image", "text")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Bad:
  """A skipped record, passed down the pipeline instead of a sample so it can be counted."""
  reason: str
  record_id: str
  detail: str


# ------------------------------------------------------------------------------------------ worker side
class _Read:
  """index -> Record | Bad, for one source (runs in the workers)."""

  def __init__(self, source):
    self.source = source

  def __call__(self, index):
    try:
      return self.source[int(index)]
    except sources_lib.BadRecord as error:
      return Bad(error.reason, error.record_id, str(error))


class Encode:
  """Record -> sample dict (numpy) | Bad: image decode + padded resize, then tokenisation (runs in the workers).

  In an image group every row has `max_len - image_words` text tokens (the original's cap with an image), so the
  decoder sees exactly `max_len` positions; a row without an image there gets the same budget (its image slots
  are padding, models/sphinx.py `layout`). In a text group rows have `max_len` tokens. Text rows ("text" task):
  BOS + text + EOS, right-truncated, every token after BOS a target (as the original's text pre-training).
  """

  def __init__(self, tokenizer, max_len: int, image_size: int, image_words: int, with_images: bool):
    self.tokenizer, self.max_len, self.image_size = tokenizer, max_len, image_size
    self.image_words, self.with_images = image_words, with_images
    self.length = max_len - image_words if with_images else max_len

  def __call__(self, record):
    if isinstance(record, Bad):
      return record
    sample = {}
    if self.with_images:
      if record.image is None:
        sample["images"] = np.zeros((self.image_size, self.image_size, 3), np.uint8)
      else:
        try:
          sample["images"] = image_lib.load_padded(record.image, self.image_size, name=_image_name(record))
        except SphinxError as error:
          return Bad("image_unreadable", record.id, str(error))
      sample["has_image"] = np.asarray(record.image is not None)
    try:
      tokenized = self._tokenize(record)
    except SphinxError as error:
      # conversation.tokenize_dialog skips a sample whose replies all fall past the truncation point.
      reason = "too_long" if "after truncation" in str(error) else "untokenizable"
      return Bad(reason, record.id, str(error))
    sample["tokens"] = _pad(tokenized.tokens, self.length)
    sample["loss_mask"] = _pad(tokenized.loss_mask, self.length)
    sample["length"] = np.asarray(tokenized.length, np.int32)
    return sample

  def _tokenize(self, record):
    if record.task == "text":
      return text_sample(self.tokenizer, record.text or "", self.length)
    return conversation.tokenize_dialog(self.tokenizer, record.conversations, max_len=self.length,
                                        record_id=record.id)


def _image_name(record):
  return f"{record.image} (record {record.id})" if isinstance(record.image, str) else f"record {record.id}"


def _pad(x, length):
  out = np.zeros(length, x.dtype)
  out[:len(x)] = x
  return out


def text_sample(tokenizer, text: str, max_len: int) -> conversation.Sample:
  """Plain text -> Sample: [BOS] + ids + [EOS], right-truncated to max_len; every token but BOS is a target."""
  ids = tokenizer.encode(text, bos=True, eos=True)[:max_len]
  if len(ids) < 2:
    raise SphinxError("empty document, nothing to predict")
  tokens = _pad(np.asarray(ids, np.int32), max_len)
  loss_mask = np.zeros(max_len, bool)
  loss_mask[1:len(ids)] = True
  return conversation.Sample(tokens, loss_mask, len(ids))


class _GoodBatches(grain.IterDataset):
  """Collects `batch_size` good samples (or packed rows) per batch; skipped records are counted in it."""

  def __init__(self, parent, batch_size: int, pack_length: int | None, bad_limit: tuple[float, int]):
    super().__init__(parent)
    self.batch_size, self.pack_length, self.bad_limit = batch_size, pack_length, bad_limit

  def __iter__(self):
    return _GoodBatchesIterator(self._parent.__iter__(), self.batch_size, self.pack_length, self.bad_limit)


class _GoodBatchesIterator(grain.DatasetIterator):
  """State = the parent's state after the last sample a returned batch used, so nothing buffered is lost.

  Packing may pull one sample that does not fit the batch; it is carried to the next batch, and the state
  points before it, so a restored iterator reads it again. `bad_limit` (fraction, minimum records) stops a
  stream in which (nearly) everything is bad here, since no batch would ever reach the main process.
  """

  def __init__(self, parent, batch_size, pack_length, bad_limit):
    super().__init__(parent)
    self.batch_size, self.pack_length, self.bad_limit = batch_size, pack_length, bad_limit
    self._carry = None
    self._state = parent.get_state()

  def __next__(self):
    rows, bad = [], {}
    if self._carry is not None:
      rows, self._carry = [self._carry], None
    while True:
      before = self._parent.get_state() if self.pack_length else None
      try:
        item = next(self._parent)
      except StopIteration:  # finite epochs: a last, short batch, or only the counts of trailing bad records
        if not rows and not bad:
          raise
        self._state = self._parent.get_state()
        if not rows:
          return {"counts": (0, bad)}
        return _stack_packed(rows, bad, self.batch_size, self.pack_length) if self.pack_length else \
            _stack(rows, bad)
      if isinstance(item, Bad):
        count, first = bad.get(item.reason, (0, f"{item.record_id}: {item.detail}"))
        bad[item.reason] = (count + 1, first)
        _check_bad_fraction(sum(c for c, _ in bad.values()), len(rows), *self.bad_limit, bad)
        continue
      if self.pack_length is None:
        rows.append(item)
        if len(rows) == self.batch_size:
          self._state = self._parent.get_state()
          return _stack(rows, bad)
      elif len(_pack(rows + [item], self.pack_length)) > self.batch_size:
        self._carry, self._state = item, before
        return _stack_packed(rows, bad, self.batch_size, self.pack_length)
      else:
        rows.append(item)

  def get_state(self):
    return self._state

  def set_state(self, state):
    self._parent.set_state(state)
    self._state, self._carry = state, None


def _check_bad_fraction(num_bad, num_good, fraction, min_records, reasons):
  seen = num_bad + num_good
  if seen >= min_records and num_bad > fraction * seen:
    summary = {r: v[0] if isinstance(v, tuple) else v for r, v in reasons.items()}
    first = "; ".join(v[1] for v in reasons.values() if isinstance(v, tuple))
    raise SphinxError(f"data: {num_bad} of {seen} records were bad ({summary}), more than "
                      f"data.max_bad_fraction={fraction}; fix the data or raise the limit. First: {first}")


def _pack(rows, length):
  samples = [conversation.Sample(r["tokens"], r["loss_mask"], int(r["length"])) for r in rows]
  return conversation.pack(samples, length)


def _stack(rows, bad):
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "length"}
  batch["counts"] = (len(rows), bad)
  return batch


def _stack_packed(rows, bad, batch_size, length):
  packed = _pack(rows, length)
  empty = conversation.Packed(*(np.zeros(length, np.int32) for _ in range(4)))
  packed += [empty] * (batch_size - len(packed))
  batch = {f.name: np.stack([getattr(p, f.name) for p in packed]) for f in dataclasses.fields(conversation.Packed)}
  batch["loss_mask"] = batch["loss_mask"].astype(bool)
  batch["counts"] = (len(rows), bad)
  return batch


# ------------------------------------------------------------------------------------------ building
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One named dataset of the mixture: its source (a random-access sequence of Records) and ratio."""
  name: str
  source: object
  ratio: float


def group_stream(specs, encode, *, batch_size, seed, shard_index, shard_count, num_workers, bad_limit,
                 pack_length=None, buffer_size=2, read_threads=2, epochs=None):
  """The Grain pipeline of one group on one process: an IterDataset of batches (see the module docstring)."""
  parts = []
  for spec in specs:
    ds = grain.MapDataset.range(len(spec.source)).shuffle(seed=_seed(seed, spec.name)).repeat(epochs)
    parts.append(ds.map(_Read(spec.source)))
  mixed = grain.MapDataset.mix(parts, [s.ratio for s in specs]) if len(parts) > 1 else parts[0]
  local = process_rows(mixed, shard_index, shard_count, batch_size)
  # Grain's default read-ahead (16 threads, 500 rows) polls every buffered row on each next(): at the demo's
  # pace (a batch of 8 per 0.18 s step) that cost 33 ms of CPU per batch against 26 ms with 2 batches' rows
  # ahead, CPU taken from the step on a small host. The encode is CPU-bound Python (the GIL), so its parallelism
  # comes from worker processes; read threads help sources that wait on storage.
  ahead = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer_size * batch_size)
  batches = _GoodBatches(local.map(encode).to_iter_dataset(ahead), batch_size, pack_length, bad_limit)
  if num_workers:
    _absl_flags_ready()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                               per_worker_buffer_size=buffer_size),
                                  worker_init_fn=exit_with_parent)
  return batches


def process_rows(stream, shard_index: int, shard_count: int, rows: int):
  """This process's part of the global stream: rows [p*b, (p+1)*b) of every global batch of P*b elements.

  So P processes together read exactly what one process reading the whole stream would, batch for batch
  (until a bad record makes one process reach further), and the stream does not depend on the process count.
  Example (P = 2, b = 2): process 0 reads elements 0, 1, 4, 5, 8, ...; process 1 reads 2, 3, 6, 7, ...
  """
  if shard_count == 1:
    return stream
  full, rest = divmod(len(stream), shard_count * rows)
  length = full * rows + min(rows, max(0, rest - shard_index * rows))
  return grain.MapDataset.range(length).map(_GlobalRow(stream, shard_index, shard_count, rows))


class _GlobalRow:
  """local index j -> the global element (j // b) * P * b + p * b + j % b (see process_rows)."""

  def __init__(self, stream, shard_index, shard_count, rows):
    self.stream, self.shard_index, self.shard_count, self.rows = stream, shard_index, shard_count, rows

  def __call__(self, j):
    batch, row = divmod(int(j), self.rows)
    return self.stream[(batch * self.shard_count + self.shard_index) * self.rows + row]


def exit_with_parent(worker_index: int, worker_count: int):
  """Grain worker init: the worker exits once the process that started it is gone. A training process killed
  with SIGKILL (preemption, OOM, kill -9) otherwise leaves its workers waiting on a queue forever, each holding
  its memory, while the rerun starts new ones."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(0)

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _absl_flags_ready():
  # Grain's multiprocess prefetch reads absl flags; outside absl.app nobody parsed them, so take the defaults.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _seed(seed, name):
  return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def group_schedule(weights, seed: int, block: int) -> list[int]:
  """Group index of each batch of block `block`: exact shares (largest remainder), order shuffled by seed."""
  w = np.asarray(weights, float) / np.sum(weights)
  counts = np.floor(w * GROUP_BLOCK).astype(int)
  rest = np.argsort(-(w * GROUP_BLOCK - counts), kind="stable")[:GROUP_BLOCK - counts.sum()]
  counts[rest] += 1
  order = np.repeat(np.arange(len(w)), counts)
  np.random.default_rng([int(seed), int(block)]).shuffle(order)
  return order.tolist()


class DataIterator:
  """Batches from the group streams in the order of the group schedule; checkpointable.

  state (JSON): {"batches": n, "groups": {group: grain state}, "records": good records, "bad": {reason: n}}.
  """

  def __init__(self, streams: dict, weights: dict, *, seed: int, batch_size: int, image_size: int,
               max_bad_fraction: float, bad_fraction_min_records: int):
    self._names = sorted(streams)
    self._streams = streams
    self._weights = [weights[g] for g in self._names]
    self._iters = {g: iter(s) for g, s in streams.items()}
    self.seed, self.batch_size, self.image_size = seed, batch_size, image_size
    self.max_bad_fraction, self.min_records = max_bad_fraction, bad_fraction_min_records
    self.batches, self.records, self.bad = 0, 0, collections.Counter()
    self._warned = set()
    self._schedule = (None, None)

  def __iter__(self):
    return self

  def group_of(self, n: int) -> str:
    block = n // GROUP_BLOCK
    if self._schedule[0] != block:
      self._schedule = (block, group_schedule(self._weights, self.seed, block))
    return self._names[self._schedule[1][n % GROUP_BLOCK]]

  def __next__(self):
    group = self.group_of(self.batches)
    batch = next(self._iters[group])  # with finite epochs, the stream ends when the scheduled group does
    good, bad = batch.pop("counts")
    self._account(bad, good)
    if "tokens" not in batch:  # only the counts of bad records after the last good one
      raise StopIteration
    self.batches += 1
    return {k: _pad_rows(v, self.batch_size) for k, v in batch.items()}

  def _account(self, bad, good):
    self.records += good
    for reason, (count, detail) in bad.items():
      self.bad[reason] += int(count)
      if reason not in self._warned:
        self._warned.add(reason)
        log.warning("skipping bad data (%s), first: %s; further ones are counted silently", reason, detail)
    _check_bad_fraction(sum(self.bad.values()), self.records, self.max_bad_fraction, self.min_records,
                        dict(self.bad))

  def get_state(self) -> dict:
    return {"batches": self.batches, "records": self.records, "bad": dict(self.bad),
            "groups": {g: _jsonable(it.get_state()) for g, it in self._iters.items()}}

  def set_state(self, state: dict):
    self.batches, self.records = int(state["batches"]), int(state["records"])
    self.bad = collections.Counter({k: int(v) for k, v in state["bad"].items()})
    for g, s in state["groups"].items():
      self._iters[g].set_state(s)

  def close(self):
    for it in self._iters.values():
      if hasattr(it, "close"):
        it.close()


def _pad_rows(x, rows):
  """The last batch of a finite stream, padded with empty rows (no targets, no image) to the fixed shape."""
  return x if len(x) == rows else np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])


def _jsonable(state):
  """Round-trips a Grain state through JSON, so a state a checkpoint cannot store fails here, not at save."""
  return json.loads(json.dumps(state))


def make_iterator(data, tokenizer, *, image_size: int, image_words: int, shard_index: int | None = None,
                  shard_count: int | None = None) -> DataIterator:
  """The training iterator of a `data` config section (config.data_config) on this process.

  image_size / image_words come from the model config (model.image_size, config.image_tokens(model)).
  """
  if shard_index is None or shard_count is None:
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if data.global_batch_size % shard_count:
    raise SphinxError(f"config.data.global_batch_size={data.global_batch_size} does not split over "
                      f"{shard_count} processes; make it a multiple.")
  batch_size = data.global_batch_size // shard_count
  specs = collections.defaultdict(list)
  for name in sorted(data.datasets):
    cfg = data.datasets[name]
    if cfg.ratio <= 0:
      continue
    group = cfg.get("group") or ("text" if cfg.kind == "text" or cfg.get("as_text") else "image")
    if group not in GROUPS:
      raise SphinxError(f"config.data.datasets.{name}.group: {group!r}; use one of {GROUPS}.")
    specs[group].append(DatasetSpec(name, sources_lib.open_source(name, cfg), float(cfg.ratio)))
  if not specs:
    raise SphinxError("config.data.datasets: no dataset with a positive ratio; add one.")
  weights = {g: sum(s.ratio for s in specs[g]) for g in specs}
  if not data.group_batches:  # one stream with every dataset; rows of a batch may mix image and text
    specs, weights = {"image": [s for g in sorted(specs) for s in specs[g]]}, {"image": 1.0}
  streams = {}
  for group, group_specs in specs.items():
    encode = Encode(tokenizer, data.max_len, image_size, image_words, with_images=group == "image")
    pack = data.max_len if (group == "text" and data.pack_text) else None
    streams[group] = group_stream(group_specs, encode, batch_size=batch_size, seed=data.seed,
                                  shard_index=shard_index, shard_count=shard_count,
                                  num_workers=data.num_workers, pack_length=pack, buffer_size=data.prefetch,
                                  read_threads=data.get("read_threads", 2),  # configs saved before it existed
                                  bad_limit=(data.max_bad_fraction, data.bad_fraction_min_records),
                                  epochs=data.epochs)
  return DataIterator(streams, weights, seed=data.seed, batch_size=batch_size, image_size=image_size,
                      max_bad_fraction=data.max_bad_fraction,
                      bad_fraction_min_records=data.bad_fraction_min_records)
