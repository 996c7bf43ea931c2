"""Checkpoints on disk: the model directory that `convert`, `mix` and `train` export and `sphinx_jax.load` reads.

A model directory is self-contained (DESIGN.md "Contracts"):
  DIR/params/          the parameter pytree, saved by Orbax (`PyTreeCheckpointer`), one array per leaf
  DIR/config.json      the resolved config (`model`, `mesh`, ...); tuples are tagged so they come back as tuples
  DIR/tokenizer.model  the sentencepiece model, copied in (optional)
  DIR/metadata.json    {"format": "sphinx_jax.model", "version", "tool", "created", "provenance": {...}}
Directories are written into a temporary sibling and renamed into place at the end (`staged_dir`), so a
failure leaves nothing at the destination. The training checkpoint manager (params, optimizer state, step,
data iterator) is a separate part of this module's job and shares only these helpers.

Leaves are addressed by '/'-joined paths ("llm/layers/attention/query/kernel"); `abstract_params` reads
shapes and dtypes from Orbax metadata only, and `restore_leaves` reads just the leaves asked for, so weight
mixing can stream leaf by leaf.

Streaming (for checkpoints larger than host memory): `open_leaf` gives a slice-readable TensorStore of one
stored leaf, and `save_streamed_model_dir` writes a model directory whose leaves are `StreamedLeaf`s, each
computed and written one storage chunk at a time (chunks of at most `chunk_bytes`; the next `lookahead`
chunks are computed in threads while one is stored), so the writer holds a few chunks per input rather than
whole trees. What it writes is an ordinary Orbax checkpoint (leaves recorded as `np.ndarray`), read back by
`load_model_dir` / `restore_leaves` like any other.

Chunks are stored uncompressed by default: zstd (Orbax's default) cost about three times the CPU of reading
or writing a raw chunk, for ~20% less disk on random-normal bf16 weights (bench/mixing.py's leaves).
Directories written with `compress=True`, or by Orbax defaults, read the same way.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
# Orbax's own spec builders, so the streamed writer and reader agree with Orbax's layout of a leaf.
from orbax.checkpoint._src.futures import future as ocp_future
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from sphinx_jax import __version__
from sphinx_jax.errors import SphinxError

FORMAT = "sphinx_jax.model"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.model"
_TUPLE_TAG = "__tuple__"


# ----------------------------------------------------------------------------------------------- files
def read_json(path) -> Any:
  """Parsed JSON, or a one-line SphinxError naming the file (missing, unreadable, not JSON)."""
  path = Path(path)
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise SphinxError(f"{path}: no such file; the checkpoint directory is incomplete.") from None
  except (OSError, UnicodeDecodeError) as error:
    raise SphinxError(f"{path}: unreadable ({error}); check the file and its permissions.") from None
  except json.JSONDecodeError as error:
    raise SphinxError(f"{path}: not valid JSON ({error}); restore or regenerate the file.") from None


def write_json(path, obj) -> None:
  Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_destination(dst, overwrite: bool = False) -> Path:
  """Refuses an existing non-empty destination unless `overwrite`; returns it as a Path."""
  dst = Path(dst)
  if dst.exists() and not dst.is_dir():
    raise SphinxError(f"{dst}: exists and is not a directory; choose another destination.")
  if dst.is_dir() and any(dst.iterdir()) and not overwrite:
    raise SphinxError(f"{dst}: exists and is not empty; choose another destination or pass --overwrite.")
  return dst


@contextlib.contextmanager
def staged_dir(dst, overwrite: bool = False):
  """Yields a temporary sibling of `dst` to write into; renamed to `dst` only if the block succeeds.

  On any failure the sibling is removed and `dst` is untouched. With `overwrite` an existing `dst` is
  replaced only after the new directory is complete.
  """
  dst = check_destination(dst, overwrite).absolute()
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
  try:
    yield tmp
    if dst.exists():
      old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
      dst.rename(old / "dir")
      tmp.rename(dst)
      shutil.rmtree(old)
    else:
      tmp.rename(dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ---------------------------------------------------------------------------------------------- config
def _to_json_value(value, where):
  if isinstance(value, (ml_collections.ConfigDict, Mapping)):
    return {str(k): _to_json_value(v, f"{where}.{k}") for k, v in value.items()}
  if isinstance(value, tuple):
    return {_TUPLE_TAG: [_to_json_value(v, where) for v in value]}
  if isinstance(value, list):
    return [_to_json_value(v, where) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise SphinxError(f"config{where}: a {type(value).__name__} cannot be saved as JSON; store names or numbers.")


def _from_json_value(value):
  if isinstance(value, dict):
    if set(value) == {_TUPLE_TAG}:
      return tuple(_from_json_value(v) for v in value[_TUPLE_TAG])
    return {k: _from_json_value(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_from_json_value(v) for v in value]
  return value


def config_to_json(config) -> dict:
  """ConfigDict -> JSON-ready dict; tuples become {"__tuple__": [...]} so they round-trip as tuples."""
  return _to_json_value(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config, "")


def config_from_json(obj) -> ml_collections.ConfigDict:
  """Inverse of `config_to_json`."""
  return ml_collections.ConfigDict(_from_json_value(obj))


# ----------------------------------------------------------------------------------------- leaf paths
def leaf_path(key_path) -> str:
  """A jax key path -> 'llm/layers/attention/query/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def flatten(tree) -> dict[str, Any]:
  """{'/'-joined path: leaf} in tree order."""
  return {leaf_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(leaves: Mapping[str, Any]) -> dict:
  """Inverse of `flatten` for nested dicts."""
  tree: dict = {}
  for path, leaf in leaves.items():
    *parents, name = path.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = leaf
  return tree


# ------------------------------------------------------------------------------------- model directory
def save_model_dir(path, params, config, tokenizer=None, metadata: Mapping | None = None,
                   overwrite: bool = False, chunk_bytes: int | None = None, compress: bool = False) -> Path:
  """Writes a model directory (layout in the module docstring) atomically; returns its path.

  Args: params, a nested dict of arrays (numpy or jax, any sharding), or of `StreamedLeaf`s (then written by
  `save_streamed_model_dir`); config, the resolved ConfigDict; tokenizer, a path to a sentencepiece model or
  None; metadata, provenance (e.g. source path and kind); chunk_bytes, the largest stored chunk (default
  CHUNK_BYTES); compress, zstd-compress the chunks (directories written either way read alike).
  """
  flat = flatten(params)
  if any(isinstance(leaf, StreamedLeaf) for leaf in flat.values()):
    if odd := [p for p, leaf in flat.items() if not isinstance(leaf, StreamedLeaf)]:
      raise SphinxError(f"parameter tree: {odd[0]!r} is an array among streamed leaves; save one kind or the other.")
    return save_streamed_model_dir(path, flat, config, tokenizer, metadata, overwrite,
                                   chunk_bytes=chunk_bytes or CHUNK_BYTES, compress=compress)
  # Bounded stored chunks let streaming readers (weight mixing) take a leaf one chunk at a time.
  save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes or CHUNK_BYTES), params)
  checkpointer = ocp.PyTreeCheckpointer(use_compression=compress)
  write = lambda dst: checkpointer.save(dst, args=ocp.args.PyTreeSave(params, save_args=save_args))
  return _write_model_dir(path, write, config, tokenizer, metadata, overwrite)


def _write_model_dir(path, write_params: Callable[[Path], None], config, tokenizer, metadata, overwrite) -> Path:
  config_json = config_to_json(config)
  if tokenizer is not None and not Path(tokenizer).is_file():
    raise SphinxError(f"{tokenizer}: tokenizer model not found; pass an existing tokenizer.model.")
  with staged_dir(path, overwrite) as tmp:
    write_params(tmp / PARAMS_DIR)
    write_json(tmp / CONFIG_FILE, config_json)
    if tokenizer is not None:
      shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    write_json(tmp / METADATA_FILE, {
        "format": FORMAT, "version": FORMAT_VERSION, "tool": f"sphinx-jax {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "provenance": dict(metadata or {}),
    })
    _fsync_tree(tmp)
  return Path(path)


def _fsync_tree(root: Path) -> None:
  """Flushes every file and directory under `root` to disk, so that what is renamed into place is complete."""
  for path in (root, *root.rglob("*")):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def read_metadata(path) -> dict:
  """metadata.json of a model directory, checked for format and version."""
  path = Path(path)
  if not path.is_dir():
    raise SphinxError(f"{path}: no such directory; give a model directory written by sphinx-jax.")
  if not (path / METADATA_FILE).exists():
    raise SphinxError(f"{path}: not a sphinx_jax model directory (no {METADATA_FILE}); create one with "
                      "`sphinx-jax convert`.")
  meta = read_json(path / METADATA_FILE)
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise SphinxError(f"{path / METADATA_FILE}: format is not {FORMAT!r}; not a sphinx_jax model directory.")
  if not isinstance(meta.get("version"), int) or meta["version"] > FORMAT_VERSION:
    raise SphinxError(f"{path / METADATA_FILE}: format version {meta.get('version')!r} is newer than this "
                      f"sphinx_jax reads ({FORMAT_VERSION}); upgrade sphinx_jax.")
  return meta


def read_config(path) -> ml_collections.ConfigDict:
  """The resolved config saved in a model directory."""
  read_metadata(path)
  return config_from_json(read_json(Path(path) / CONFIG_FILE))


def tokenizer_path(path) -> Path | None:
  candidate = Path(path) / TOKENIZER_FILE
  return candidate if candidate.is_file() else None


def _params_dir(path) -> Path:
  read_metadata(path)
  params = Path(path) / PARAMS_DIR
  if not params.is_dir():
    raise SphinxError(f"{params}: missing; the model directory is incomplete, export it again.")
  return params.absolute()


def abstract_params(path) -> dict:
  """{leaf path: jax.ShapeDtypeStruct} of a model directory, from Orbax metadata (no array data read)."""
  return orbax_shapes(_params_dir(path))


def orbax_shapes(params) -> dict:
  """{leaf path: jax.ShapeDtypeStruct} of any Orbax pytree checkpoint directory (e.g. DIR/params)."""
  try:
    item = ocp.PyTreeCheckpointer().metadata(params).item_metadata
  except (OSError, ValueError, KeyError) as error:
    item, reason = None, error
  else:
    reason = "no item metadata"
  if item is None:
    raise SphinxError(f"{params}: unreadable Orbax metadata ({reason}); the checkpoint is damaged, export it again.")
  tree = item.tree
  return {p: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for p, m in flatten(tree).items()}


def _restore_args(leaves: Iterable[str], shardings: Mapping[str, Any] | None):
  def one(p):
    if shardings is None:
      return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(sharding=shardings[p])
  return unflatten({p: one(p) for p in leaves})


def _restore(params_dir, leaves, shardings, partial):
  item = unflatten({p: 0 for p in leaves})
  args = ocp.args.PyTreeRestore(item=item, restore_args=_restore_args(leaves, shardings), partial_restore=partial)
  try:
    return ocp.PyTreeCheckpointer().restore(params_dir, args=args)
  except (OSError, ValueError, KeyError) as error:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise SphinxError(f"{params_dir}: could not restore parameters ({reason}); export the model again.") from None


def restore_leaves(path, leaves: Iterable[str], shardings: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Reads only the named leaves: {leaf path: np.ndarray} (or jax.Array placed by `shardings[leaf path]`)."""
  params_dir = _params_dir(path)
  leaves = list(leaves)
  if unknown := sorted(set(leaves) - set(abstract_params(path))):
    raise SphinxError(f"{params_dir}: no parameter(s) {unknown[:3]}; run `sphinx-jax inspect {path}` for the list.")
  return flatten(_restore(params_dir, leaves, shardings, partial=True))


def load_model_dir(path, shardings=None):
  """(params, config, tokenizer path or None) of a model directory.

  `shardings`: None for host numpy arrays, or a pytree of `jax.sharding.Sharding` with the params' structure
  (e.g. from `sharding.param_shardings`) to restore every leaf straight onto a mesh.
  """
  config = read_config(path)
  leaves = list(abstract_params(path))
  if shardings is not None:
    given = flatten(shardings)
    if set(given) != set(leaves):
      missing, extra = sorted(set(leaves) - set(given)), sorted(set(given) - set(leaves))
      raise SphinxError(f"{path}: shardings do not match the parameters (missing {missing[:3]}, extra {extra[:3]}).")
    shardings = given
  params = _restore(_params_dir(path), leaves, shardings, partial=False)
  return params, config, tokenizer_path(path)


# ------------------------------------------------------------------------------------------ streaming
# Largest stored chunk of a leaf: what a streaming reader or writer holds per array. Chunk-sized buffers
# (also a bf16 chunk read as float32, twice the size) stay below glibc's 32 MiB ceiling for mmap'd
# allocations, so they are recycled from the heap instead of being mapped and zeroed afresh for every chunk:
# a mix with 64 MiB chunks spent twice the system time, with 16 MiB chunks 18% more (bench/mixing.py inputs).
CHUNK_BYTES = 8 << 20
LOOKAHEAD = 2  # chunks a streamed write computes ahead of the one being stored: two keep two cores busy


@dataclasses.dataclass(frozen=True)
class StreamedLeaf:
  """A leaf produced piece by piece: `fill(region)` returns the values of `region` (a tuple of slices, one
  storage chunk) as an array of `dtype` (other dtypes are cast). A plain class, not a tuple, so that jax sees
  it as one leaf. `split_axes`: axes the storage chunks are cut along first (Orbax's `shard_axes`), e.g. (0,)
  keeps every chunk of a stacked [L, ...] leaf within one layer."""
  shape: tuple[int, ...]
  dtype: np.dtype
  fill: Callable[[tuple[slice, ...]], np.ndarray]
  split_axes: tuple[int, ...] = ()

  def astype(self, dtype) -> "StreamedLeaf":
    """The same leaf written as `dtype` (cast chunk by chunk), so dtype conversions work on streamed trees."""
    return dataclasses.replace(self, dtype=np.dtype(dtype))


def chunk_regions(shape, chunk) -> Iterator[tuple[slice, ...]]:
  """Every block of the chunk grid of an array, e.g. shape (5, 4), chunk (2, 4) -> rows 0:2, 2:4, 4:5."""
  ranges = [[slice(i, min(i + c, n)) for i in range(0, n, c)] for n, c in zip(shape, chunk)]
  return itertools.product(*ranges)


class _StreamedLeafHandler(ocp.type_handlers.NumpyHandler):
  """Writes `StreamedLeaf`s one chunk at a time, in order (Orbax's NumpyHandler writes every leaf of a batch
  at once from arrays already in memory). Recorded as 'np.ndarray', so readers need nothing new."""

  def __init__(self, lookahead: int):
    super().__init__(deepcopy_host_arrays=False)
    self.lookahead = lookahead

  async def serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    return [ocp_future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos, args),
                                                             name="streamed_leaf")]

  async def _write_all(self, values, infos, args):
    stores = []
    context = None
    for leaf, info, arg in zip(values, infos, args):
      await info.await_path_creation()
      if jax.process_index() != 0:  # like NumpyHandler: host arrays are written once, by process 0
        continue
      spec = ts_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=leaf.shape, local_shape=leaf.shape, dtype=leaf.dtype,
          use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint)).json
      # No fsync per chunk: the directory is flushed once, before it is renamed into place (_write_model_dir),
      # so the kernel writes back while the next chunks are computed (mix wall time 6-7 s -> 4.5 s at 0.8 GB).
      context = context or ts.Context({"file_io_sync": False}, parent=info.ts_context)
      stores.append((leaf, await ts.open(ts.Spec(spec), create=True, open=True, context=context)))
    # A 0-d leaf (CLIP's logit_scale) has no chunk grid: one region, ().
    jobs = ((leaf, store, region) for leaf, store in stores
            for region in chunk_regions(leaf.shape, store.chunk_layout.write_chunk.shape if leaf.shape else ()))
    await _write_chunks(jobs, self.lookahead)


def _filled(leaf: StreamedLeaf, region) -> np.ndarray:
  return np.asarray(leaf.fill(region), dtype=leaf.dtype)


async def _write_chunks(jobs: Iterable[tuple[StreamedLeaf, ts.TensorStore, tuple[slice, ...]]], lookahead: int):
  """Stores every (leaf, store, region) job in order while the fills of the next `lookahead` jobs run in
  threads (numpy and TensorStore release the GIL), so reading, computing and writing overlap."""
  jobs = iter(jobs)
  with concurrent.futures.ThreadPoolExecutor(lookahead, thread_name_prefix="fill") as pool:
    queued = collections.deque()
    write = None
    try:
      for leaf, store, region in itertools.islice(jobs, lookahead):
        queued.append((store, region, pool.submit(_filled, leaf, region)))
      while queued:
        store, region, fill = queued.popleft()
        chunk = await asyncio.wrap_future(fill)
        for leaf, next_store, next_region in itertools.islice(jobs, 1):
          queued.append((next_store, next_region, pool.submit(_filled, leaf, next_region)))
        if write is not None:
          await write
        # The chunk is a fresh array nobody changes afterwards, so TensorStore may keep it instead of a copy.
        write = store[region].write(chunk, can_reference_source_data_indefinitely=True)
    finally:  # also when a fill fails: no write may land after the caller has removed the directory
      for _, _, fill in queued:
        fill.cancel()
      concurrent.futures.wait([fill for _, _, fill in queued])
      if write is not None:
        await write


def save_streamed_model_dir(path, leaves: Mapping[str, StreamedLeaf], config, tokenizer=None,
                            metadata: Mapping | None = None, overwrite: bool = False,
                            chunk_bytes: int = CHUNK_BYTES, compress: bool = False,
                            lookahead: int = LOOKAHEAD) -> Path:
  """Like `save_model_dir`, for `{leaf path: StreamedLeaf}`: leaves are written in order, chunk by chunk,
  with the fills of the next `lookahead` chunks running in threads meanwhile.

  An exception raised by a `fill` aborts the save and leaves nothing at `path`.
  """
  registry = ocp.type_handlers.create_type_handler_registry((jax.Array, ocp.type_handlers.ArrayHandler()),
                                                            (StreamedLeaf, _StreamedLeafHandler(lookahead)))
  # Host data written by this process alone, with barriers among itself only: process 0 of a multi-process
  # training run exports while the other processes have finished.
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=compress,
                                        multiprocessing_options=alone)
  tree = unflatten(dict(leaves))
  save_args = jax.tree.map(lambda leaf: ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=leaf.split_axes), tree)

  def write(dst):
    with ocp.Checkpointer(handler, multiprocessing_options=alone) as checkpointer, _quiet_about(SphinxError):
      checkpointer.save(dst, args=ocp.args.PyTreeSave(tree, save_args=save_args))

  return _write_model_dir(path, write, config, tokenizer, metadata, overwrite)


class _DropExceptions(logging.Filter):
  def __init__(self, kind):
    super().__init__()
    self.kind = kind

  def filter(self, record):
    return not (record.exc_info and isinstance(record.exc_info[1], self.kind))


@contextlib.contextmanager
def _quiet_about(kind):
  """Orbax logs a traceback for an exception raised in its writer threads before re-raising it; a SphinxError
  from a `fill` is the user's one-line message, so that log is dropped."""
  log, drop = logging.getLogger("absl"), _DropExceptions(kind)
  log.addFilter(drop)
  try:
    yield
  finally:
    log.removeFilter(drop)


@functools.cache
def _read_context(use_ocdbt: bool) -> ts.Context:
  """One TensorStore context per process, so every opened leaf shares one bounded cache pool."""
  return ts_utils.get_ts_context(use_ocdbt=use_ocdbt)


def open_leaf(params_dir, leaf: str) -> ts.TensorStore:
  """A slice-readable TensorStore of one leaf of an Orbax pytree checkpoint directory (e.g. DIR/params)."""
  params_dir = Path(params_dir).absolute()
  layout = read_json(params_dir / "_METADATA")
  use_ocdbt = bool(layout.get("use_ocdbt", True))
  spec = ts_utils.ArrayReadSpec(directory=params_dir.as_posix(), relative_array_filename=leaf.replace("/", "."),
                                use_zarr3=bool(layout.get("use_zarr3", False)), use_ocdbt=use_ocdbt).json
  try:
    return ts.open(spec, open=True, context=_read_context(use_ocdbt)).result()
  except ValueError as error:
    raise SphinxError(f"{params_dir}: cannot open parameter {leaf!r} ({str(error).splitlines()[0]}); the "
                      "checkpoint is damaged, export it again.") from None
