"""`sphinx-jax inspect PATH`: the key / shape / dtype table of any checkpoint kind, reading no tensor data.

Kinds (detected from the files present):
  orbax      a sphinx_jax model directory (metadata.json + params/) or a bare Orbax pytree directory
  accessory  LLaMA2-Accessory: consolidated.XX-of-YY.model.pth + config.json + meta.json; one shape column per
             model-parallel shard, in rank order
  hf         Hugging Face: model.safetensors[.index.json] or pytorch_model*.bin[.index.json] + config.json
  file       a single .safetensors / .pth / .bin file
Shapes come from safetensors headers, Orbax metadata and memory-mapped torch pickles (weights-only).
Output: a header line, one `key  [shape]  dtype` line per tensor (natural key order), then a `total:` line.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from sphinx_jax import checkpoint
from sphinx_jax.convert import accessory, torch_io
from sphinx_jax.errors import SphinxError


def natural_key(key: str):
  """'layers.10.w' sorts after 'layers.9.w'."""
  return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def format_shape(shape) -> str:
  return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _row(key, shapes, dtype) -> str:
  return f"{key}  {' '.join(format_shape(s) if s is not None else '-' for s in shapes)}  {dtype}"


def _total(n_tensors, n_params, n_bytes) -> str:
  return f"total: {n_tensors} tensors, {n_params:,} parameters, {n_bytes:,} bytes"


def _itemsize(dtype_name) -> int:
  return np.dtype(dtype_name).itemsize  # 'bfloat16' resolves once ml_dtypes is imported (torch_io does)


def _table(specs: dict[str, tuple[tuple, str]]) -> Iterator[str]:
  """Lines for {key: (shape, dtype)} and the total."""
  n_params = n_bytes = 0
  for key in sorted(specs, key=natural_key):
    shape, dtype = specs[key]
    yield _row(key, [shape], dtype)
    n_params += int(np.prod(shape))
    n_bytes += int(np.prod(shape)) * _itemsize(dtype)
  yield _total(len(specs), n_params, n_bytes)


def detect_kind(path: Path) -> str:
  if path.is_file():
    return "file"
  if not path.is_dir():
    raise SphinxError(f"{path}: no such file or directory; give a checkpoint path.")
  if (path / checkpoint.METADATA_FILE).exists() or (path / "_CHECKPOINT_METADATA").exists() or (
      path / "_METADATA").exists():
    return "orbax"
  if any(accessory.SHARD_RE.match(p.name) for p in path.iterdir()):
    return "accessory"
  names = {p.name for p in path.iterdir()}
  if names & {torch_io.SAFETENSORS_INDEX, torch_io.SAFETENSORS_SINGLE, torch_io.BIN_INDEX, torch_io.BIN_SINGLE}:
    return "hf"
  raise SphinxError(f"{path}: no checkpoint recognised (no metadata.json/params, consolidated.*.pth, "
                    "model.safetensors* or pytorch_model*.bin); check the path.")


def inspect_orbax(path: Path) -> Iterator[str]:
  if (path / checkpoint.METADATA_FILE).exists():
    meta = checkpoint.read_metadata(path)
    model = checkpoint.read_config(path).model
    llm = model.llm
    tokenizer = "tokenizer.model" if checkpoint.tokenizer_path(path) else "no tokenizer"
    source = meta.get("provenance", {}).get("source", "?")
    yield (f"orbax model directory: {path} (towers {list(model.towers)}, llm dim {llm.dim} x {llm.n_layers} "
           f"layers, scan_layers {llm.scan_layers}; {tokenizer}; from {source})")
    shapes = checkpoint.abstract_params(path)
  else:
    yield f"orbax pytree: {path}"
    shapes = checkpoint.orbax_shapes(path.absolute())
  yield from _table({k: (s.shape, np.dtype(s.dtype).name) for k, s in shapes.items()})


def inspect_hf(path: Path) -> Iterator[str]:
  source = torch_io.open_hf_weights(path)
  config = checkpoint.read_json(path / "config.json") if (path / "config.json").exists() else {}
  architectures = ",".join(config.get("architectures", [])) or "no config.json architectures"
  files = ", ".join(f.path.name for f in source.files)
  yield f"hf: {path} ({architectures}; {len(source.files)} file(s): {files})"
  yield from _table({key: source.spec(key) for key in source})


def inspect_accessory(path: Path) -> Iterator[str]:
  shards = accessory.shard_paths(path)
  meta = checkpoint.read_json(path / "meta.json") if (path / "meta.json").exists() else {}
  files = [torch_io.PthFile(p) for p in shards]
  yield (f"accessory: {path} (llama_type {meta.get('llama_type', '?')}; {len(files)} shard(s): "
         f"{', '.join(p.name for p in shards)})")
  specs = [{key: f.spec(key) for key in f.keys()} for f in files]
  n_params = n_bytes = 0
  keys = sorted(set().union(*specs), key=natural_key)
  for key in keys:
    shapes = [s[key][0] if key in s else None for s in specs]
    dtype = next(s[key][1] for s in specs if key in s)
    yield _row(key, shapes, dtype)
    for shard in specs:
      if key in shard:
        n_params += int(np.prod(shard[key][0]))
        n_bytes += int(np.prod(shard[key][0])) * _itemsize(shard[key][1])
  yield _total(len(keys), n_params, n_bytes) + " (summed over shards)"


def inspect_file(path: Path) -> Iterator[str]:
  f = torch_io.open_file(path)
  yield f"file: {path}"
  yield from _table({key: f.spec(key) for key in f.keys()})


INSPECTORS = {"orbax": inspect_orbax, "hf": inspect_hf, "accessory": inspect_accessory, "file": inspect_file}


def inspect(path) -> Iterator[str]:
  """The lines `sphinx-jax inspect` prints for `path`."""
  path = Path(path)
  return INSPECTORS[detect_kind(path)](path)
