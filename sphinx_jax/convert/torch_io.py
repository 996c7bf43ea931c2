"""Safe reading and writing of PyTorch-side checkpoint files: `.pth`/`.bin` pickles and `.safetensors`.

Mirrors what `transformers` (`model.safetensors[.index.json]`, `pytorch_model*.bin[.index.json]`) and
LLaMA2-Accessory (`consolidated.XX-of-YY.model.pth`, a bare state dict or `{"model": state_dict}`) write.
Sources are presented as a lazy `TensorSource`: keys, shapes and dtypes come from headers (safetensors) or
memory-mapped pickles (torch), and a tensor is read, as a numpy array, only when its key is indexed, so
converters stream tensor by tensor. bfloat16 travels as `ml_dtypes.bfloat16`, bit for bit.

Checkpoint files are untrusted: pickles are opened only with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers; every failure is one `SphinxError` line naming the file.

A memory-mapped pickle's pages count in the process's resident memory once read, until they are unmapped;
`PthFile.release` drops them (a streamed import calls it as it goes, see convert/accessory.py).
"""
from __future__ import annotations

import ctypes
import functools
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np
import safetensors
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from sphinx_jax.checkpoint import read_json, write_json
from sphinx_jax.errors import SphinxError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
DEFAULT_SHARD_BYTES = 4 * 2**30

# safetensors header dtype codes -> numpy names (the vocabulary `inspect` prints).
_MADV_DONTNEED = 4  # <sys/mman.h> on Linux
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
  """torch -> numpy without changing a bit; bfloat16 (which numpy lacks) becomes ml_dtypes.bfloat16."""
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def to_torch(array: np.ndarray) -> torch.Tensor:
  """numpy -> torch without changing a bit; the inverse of `to_numpy`."""
  array = np.asarray(array, order="C")  # not ascontiguousarray: it turns 0-d (CLIP logit_scale) into [1]
  if array.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def dtype_name(dtype) -> str:
  """'float32', 'bfloat16', ... for numpy, ml_dtypes and torch dtypes alike."""
  if isinstance(dtype, torch.dtype):
    return str(dtype).removeprefix("torch.")
  return np.dtype(dtype).name


class SafetensorsFile:
  """One `.safetensors` file; the header is parsed (and the file size checked) on open, data on `read`."""

  def __init__(self, path):
    self.path = Path(path)
    if not self.path.is_file():
      raise SphinxError(f"{self.path}: no such file; check the checkpoint path.")
    try:
      self._file = safe_open(str(self.path), framework="numpy")
      self._keys = list(self._file.keys())
    except (safetensors.SafetensorError, OSError) as error:
      raise SphinxError(f"{self.path}: not a readable safetensors file ({error}); the file is truncated or "
                        "corrupt, download or export it again.") from None

  def keys(self) -> list[str]:
    return self._keys

  def spec(self, key) -> tuple[tuple[int, ...], str]:
    tensor = self._file.get_slice(key)
    return tuple(tensor.get_shape()), _SAFETENSORS_DTYPES.get(tensor.get_dtype(), tensor.get_dtype())

  def read(self, key) -> np.ndarray:
    return self._file.get_tensor(key)


def load_pth(path) -> dict[str, torch.Tensor]:
  """A `.pth`/`.bin` state dict, memory-mapped, via the weights-only unpickler (no code can run).

  Accepts a bare state dict or `{"model": state_dict}` (LLaMA2-Accessory's `save_checkpoint`).
  """
  path = Path(path)
  if not path.is_file():
    raise SphinxError(f"{path}: no such file; check the checkpoint path.")
  if not zipfile.is_zipfile(path):
    raise SphinxError(f"{path}: not a torch zip checkpoint (truncated, or a legacy/foreign pickle); refusing to "
                      "unpickle it. Download it again, re-save it with torch.save, or provide safetensors.")
  try:
    state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
  except pickle.UnpicklingError as error:
    first = str(error).strip().splitlines()[-1] if str(error).strip() else "forbidden object"
    raise SphinxError(f"{path}: refused to unpickle (holds more than tensors: {first}); only weights-only "
                      "checkpoints are accepted, re-save it as a plain state dict.") from None
  except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise SphinxError(f"{path}: unreadable torch checkpoint ({reason}); the file is truncated or corrupt.") from None
  if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
    state = state["model"]
  if not isinstance(state, Mapping):
    raise SphinxError(f"{path}: holds a {type(state).__name__}, not a state dict; save model.state_dict().")
  for key, value in state.items():
    if not isinstance(key, str) or not isinstance(value, torch.Tensor):
      raise SphinxError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a state dict "
                        "(or {'model': state_dict}).")
  return dict(state)


def mapped_ranges(path) -> list[tuple[int, int]]:
  """[(start, end)] addresses of this process's mappings of the file `path` ([] where there is no /proc)."""
  target = str(Path(path).resolve())
  try:
    lines = Path("/proc/self/maps").read_text().splitlines()
  except OSError:
    return []
  ranges = []
  for line in lines:
    fields = line.split(maxsplit=5)  # address perms offset dev inode path (a path may hold spaces)
    if len(fields) == 6 and fields[5] == target:
      start, end = fields[0].split("-")
      ranges.append((int(start, 16), int(end, 16)))
  return ranges


@functools.cache
def _libc():
  return ctypes.CDLL(None, use_errno=True)


def drop_resident(ranges) -> None:
  """madvise(MADV_DONTNEED) over private, never-written file mappings: their pages leave the process's
  resident set and a later access reads the same bytes again from the page cache (or the file). Never call it
  on memory anyone writes to: the writes would be lost."""
  for start, end in ranges:
    if _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED):
      error = ctypes.get_errno()
      raise OSError(error, f"madvise(MADV_DONTNEED) on a checkpoint mapping failed: {os.strerror(error)}")


class PthFile:
  """One torch pickle (`.pth`, `.bin`) read through `load_pth`; tensors stay memory-mapped until `read`."""

  def __init__(self, path):
    self.path = Path(path)
    self._state = load_pth(self.path)
    self._mapped = mapped_ranges(self.path)  # torch.load(mmap=True) maps the whole file, privately, read-only use

  def release(self) -> None:
    """Drops the pages of this file read so far from the process's resident memory (`drop_resident`); arrays
    already handed out stay valid and read the same bytes. Nothing here writes to the mapping."""
    drop_resident(self._mapped)

  def keys(self) -> list[str]:
    return list(self._state)

  def spec(self, key) -> tuple[tuple[int, ...], str]:
    tensor = self._state[key]
    return tuple(tensor.shape), dtype_name(tensor.dtype)

  def read(self, key) -> np.ndarray:
    return to_numpy(self._state[key])


def open_file(path):
  """A `SafetensorsFile` or `PthFile` chosen by suffix."""
  path = Path(path)
  if path.suffix == ".safetensors":
    return SafetensorsFile(path)
  if path.suffix in (".pth", ".bin", ".pt"):
    return PthFile(path)
  raise SphinxError(f"{path}: unknown checkpoint file type; expected .safetensors, .pth or .bin.")


class TensorSource(Mapping):
  """Lazy `key -> np.ndarray` over one or more files: keys without loading, one tensor per access."""

  def __init__(self, files: Iterable, index: tuple[Path, Mapping[str, str]] | None = None):
    """`index`: (index.json path, its weight_map), checked against what the files hold."""
    self.files = list(files)
    self._owner = {}
    for f in self.files:
      for key in f.keys():
        if key in self._owner:
          raise SphinxError(f"{f.path}: tensor {key!r} also in {self._owner[key].path}; a checkpoint must hold "
                            "each tensor once.")
        self._owner[key] = f
    if index is not None:
      _check_weight_map(self._owner, *index)

  def __getitem__(self, key) -> np.ndarray:
    return self._owner[key].read(key)

  def __contains__(self, key) -> bool:  # Mapping's default would read the tensor
    return key in self._owner

  def __iter__(self) -> Iterator[str]:
    return iter(self._owner)

  def __len__(self) -> int:
    return len(self._owner)

  def spec(self, key) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of `key`, from headers only."""
    return self._owner[key].spec(key)

  def file_of(self, key) -> Path:
    return self._owner[key].path


def _check_weight_map(owner, index_path, weight_map):
  """An index.json must name exactly the tensors its shards hold, each in the file it says."""
  for key, file_name in weight_map.items():
    if key not in owner:
      raise SphinxError(f"{index_path}: names tensor {key!r} in {file_name}, which does not hold it; the shard is "
                        "incomplete, download it again.")
    if owner[key].path.name != file_name:
      raise SphinxError(f"{index_path}: puts tensor {key!r} in {file_name} but it is in {owner[key].path}; "
                        "fix the index.")
  if extra := sorted(set(owner) - set(weight_map)):
    raise SphinxError(f"{owner[extra[0]].path}: tensor(s) {extra[:3]} are not in {index_path}; fix the index.")


def _indexed(directory: Path, index_name: str, opener: Callable) -> TensorSource:
  index = read_json(directory / index_name)
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise SphinxError(f"{directory / index_name}: no 'weight_map' object; not a Hugging Face index file.")
  files = [opener(directory / name) for name in sorted(set(weight_map.values()))]
  return TensorSource(files, (directory / index_name, weight_map))


def open_hf_weights(directory) -> TensorSource:
  """The weights of a Hugging Face model directory: sharded or single safetensors, else pytorch_model*.bin."""
  directory = Path(directory)
  if not directory.is_dir():
    raise SphinxError(f"{directory}: no such directory; give a Hugging Face model directory.")
  if (directory / SAFETENSORS_INDEX).exists():
    return _indexed(directory, SAFETENSORS_INDEX, SafetensorsFile)
  if (directory / SAFETENSORS_SINGLE).exists():
    return TensorSource([SafetensorsFile(directory / SAFETENSORS_SINGLE)])
  if (directory / BIN_INDEX).exists():
    return _indexed(directory, BIN_INDEX, PthFile)
  if (directory / BIN_SINGLE).exists():
    return TensorSource([PthFile(directory / BIN_SINGLE)])
  raise SphinxError(f"{directory}: no weights found; expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
                    f"{BIN_SINGLE} or {BIN_INDEX}.")


def _shard_name(i, n):
  return SAFETENSORS_SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def save_safetensors_shards(directory, items: Iterable[tuple[str, np.ndarray]],
                            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
  """Writes `(key, array)` pairs as HF safetensors shards (+ `model.safetensors.index.json` when > 1).

  Holds at most one shard in memory. Shards are named `model-0000i-of-0000n.safetensors` once n is known;
  a single shard is `model.safetensors`. Each carries the `format: pt` metadata transformers writes (older
  transformers releases refuse files without it).
  Returns the file names written.
  """
  directory = Path(directory)
  pending, parts, seen, total = {}, [], set(), 0

  def flush():
    part = directory / f".part-{len(parts):05d}.safetensors"
    save_file(pending, str(part), metadata={"format": "pt"})
    parts.append((part, list(pending)))
    pending.clear()

  size = 0
  for key, array in items:
    if key in seen:
      raise SphinxError(f"tensor {key!r} produced twice while writing {directory}; this is a converter bug.")
    seen.add(key)
    array = np.asarray(array, order="C")  # keeps 0-d arrays 0-d (ascontiguousarray would not)
    if pending and size + array.nbytes > max_shard_bytes:
      flush()
      size = 0
    pending[key] = array
    size += array.nbytes
    total += array.nbytes
  if pending or not parts:
    flush()
  names, weight_map = [], {}
  for i, (part, keys) in enumerate(parts):
    name = _shard_name(i, len(parts))
    part.rename(directory / name)
    names.append(name)
    weight_map.update({key: name for key in keys})
  if len(parts) > 1:
    write_json(directory / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
  return names


def save_pth(path, items: Iterable[tuple[str, np.ndarray]]) -> None:
  """Writes `(key, array)` pairs as a torch state dict (tensors only, dtypes kept, e.g. bfloat16)."""
  state = {}
  for key, array in items:
    if key in state:
      raise SphinxError(f"tensor {key!r} produced twice while writing {path}; this is a converter bug.")
    state[key] = to_torch(array)
  torch.save(state, path)
