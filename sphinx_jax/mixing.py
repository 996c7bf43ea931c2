"""Weight mixing: pytree arithmetic over model directories, streamed chunk by chunk.

Mirrors SPHINX's domain weight mix (SPHINX.md §8: the LLM tuned on real-world captions initialises a copy
tuned on synthetic captions, and the two are interpolated, θ = β·θ_real + (1−β)·θ_syn; β is not published, so
it is a parameter) and generalises it to model soups and task arithmetic. LLaMA2-Accessory ships no mixing
script; the formulas are the paper's.

For every leaf selected by the `include` patterns (full-match regexes over '/'-joined leaf paths, default
`llm/.*`):
  weighted average   θ = Σ w_i θ_i                       (β, 1−β) for two inputs is the interpolation
  task arithmetic    θ = θ_base + Σ λ_i (θ_i − θ_base)   when `base` is given
computed in float32 and stored in the leaf's own dtype. Other leaves are copied from the first input
unchanged, bit for bit. Shapes: every input leaf float[...] of one shape and dtype -> the same.

Nothing is held whole: each output leaf is written one storage chunk at a time (checkpoint.py
`save_streamed_model_dir`, which computes the next `LOOKAHEAD` chunks in threads while one is stored), and
each chunk reads only its slice of every input (`open_leaf`), converted to float32 by TensorStore as it is
read; the sum is formed in those buffers. Memory stays near (LOOKAHEAD + 1) x (inputs + 1) chunks in
float32. Inputs are checked before anything is written (same leaves, shapes, dtypes, model config and
tokenizer); a non-finite input or result aborts the write naming the leaf and the input.
"""
from __future__ import annotations

import dataclasses
import filecmp
import re
import sys
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tensorstore as ts

from sphinx_jax import checkpoint
from sphinx_jax.errors import SphinxError

DEFAULT_INCLUDE = ("llm/.*",)  # SPHINX mixes the language model; towers and fusion come from the first input
SUM_TOLERANCE = 1e-6
REPAIR = "repair that checkpoint or leave it out"
BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What to mix: model directories, one weight each, an optional base (task arithmetic), leaf patterns."""
  inputs: tuple[str, ...]
  weights: tuple[float, ...]
  base: str | None = None
  include: tuple[str, ...] = DEFAULT_INCLUDE

  def provenance(self) -> dict:
    formula = "base + sum(w_i * (input_i - base))" if self.base else "sum(w_i * input_i)"
    return {"operation": "mix", "formula": formula, "inputs": [str(Path(p).absolute()) for p in self.inputs],
            "weights": list(self.weights), "base": str(Path(self.base).absolute()) if self.base else None,
            "include": list(self.include)}


# ------------------------------------------------------------------------------------------- arithmetic
def combine(arrays: Sequence[np.ndarray], weights: Sequence[float], base: np.ndarray | None = None) -> np.ndarray:
  """Σ w_i a_i, or base + Σ w_i (a_i − base), in float32; `arrays` must be float32 and are overwritten.

  Works in the inputs' own buffers, so a chunk costs no temporaries. Returns the buffer of arrays[0].
  E.g. combine([a, b], [0.25, 0.75]) = 0.25 a + 0.75 b; combine([a], [1.0]) = a exactly.
  """
  total = arrays[0]
  for i, (array, weight) in enumerate(zip(arrays, weights)):
    if base is not None:
      np.subtract(array, base, out=array)
    np.multiply(array, np.float32(weight), out=array)
    if i:
      np.add(total, array, out=total)
  if base is not None:
    np.add(total, base, out=total)
  return total


def check_weights(recipe: Recipe, allow_any: bool = False) -> None:
  """One weight per input; for averages they sum to 1; none negative. `allow_any` lifts the last two."""
  if len(recipe.inputs) < (1 if recipe.base else 2):
    raise SphinxError(f"mix: got {len(recipe.inputs)} input(s); give at least two (or one with --base).")
  if len(recipe.weights) != len(recipe.inputs):
    raise SphinxError(f"mix: {len(recipe.inputs)} inputs but {len(recipe.weights)} weights; give one weight "
                      "per input, in the same order.")
  if not all(np.isfinite(recipe.weights)):
    raise SphinxError(f"mix: weights {list(recipe.weights)} are not all finite numbers.")
  if allow_any:
    return
  if any(w < 0 for w in recipe.weights):
    raise SphinxError(f"mix: negative weight in {list(recipe.weights)}; pass --allow-any-weights if you mean "
                      "extrapolation or task negation.")
  if recipe.base is None and abs(sum(recipe.weights) - 1.0) > SUM_TOLERANCE:
    raise SphinxError(f"mix: weights {list(recipe.weights)} sum to {sum(recipe.weights):.6g}, not 1, so the "
                      "result is no average; rescale them or pass --allow-any-weights.")


def selected(leaves: Sequence[str], include: Sequence[str]) -> set[str]:
  """The leaf paths that fully match one of the `include` regexes; each pattern must match something."""
  try:
    patterns = [re.compile(p) for p in include]
  except re.error as error:
    raise SphinxError(f"mix: bad --include pattern ({error}); give Python regexes such as 'llm/.*'.") from None
  chosen = set()
  for pattern in patterns:
    matches = {leaf for leaf in leaves if pattern.fullmatch(leaf)}
    if not matches:
      raise SphinxError(f"mix: --include {pattern.pattern!r} matches no parameter; run `sphinx-jax inspect` "
                        "on an input for the leaf paths.")
    chosen |= matches
  return chosen


# ---------------------------------------------------------------------------------------------- checks
def _mismatches(reference: dict, other: dict) -> list[str]:
  """Leaf paths that differ between two {path: ShapeDtypeStruct} tables, each with the difference."""
  problems = [f"{p} missing" for p in reference if p not in other]
  problems += [f"{p} unexpected" for p in other if p not in reference]
  for p in reference.keys() & other.keys():
    a, b = reference[p], other[p]
    if (a.shape, a.dtype) != (b.shape, b.dtype):
      problems.append(f"{p} {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
  return sorted(problems)


def check_inputs(recipe: Recipe) -> dict:
  """{leaf: ShapeDtypeStruct} of the first input after checking every model directory agrees with it."""
  dirs = list(recipe.inputs) + ([recipe.base] if recipe.base else [])
  first = dirs[0]
  shapes, model = checkpoint.abstract_params(first), checkpoint.read_config(first).model.to_dict()
  tokenizer = checkpoint.tokenizer_path(first)
  for other in dirs[1:]:
    if problems := _mismatches(shapes, checkpoint.abstract_params(other)):
      raise SphinxError(f"mix: {other} does not match {first} ({len(problems)} leaves differ, first: "
                        f"{'; '.join(problems[:3])}); mix checkpoints of one model.")
    other_model = checkpoint.read_config(other).model.to_dict()
    if other_model != model:
      keys = sorted(k for k in model.keys() | other_model.keys() if model.get(k) != other_model.get(k))
      raise SphinxError(f"mix: {other} has another model config than {first} (config.model.{keys[0]} differs); "
                        "mix checkpoints of one model.")
    other_tokenizer = checkpoint.tokenizer_path(other)
    same = (tokenizer is None) == (other_tokenizer is None) and (
        tokenizer is None or filecmp.cmp(tokenizer, other_tokenizer, shallow=False))
    if not same:
      raise SphinxError(f"mix: {other} and {first} carry different tokenizers; mix checkpoints of one model.")
  return shapes


# --------------------------------------------------------------------------------------------- streams
def _all_finite(values: np.ndarray) -> bool:
  """No inf or nan in a floating-point array."""
  if values.dtype == BF16:  # np.isfinite on ml_dtypes' bfloat16 is ~4x slower than testing the exponent bits
    return int((values.view(np.uint16) & 0x7FFF).max(initial=0)) < 0x7F80
  return bool(np.isfinite(values).all())


def _region_text(region) -> str:
  return ", ".join(f"{r.start}:{r.stop}" for r in region)


def _blame(leaf: str, region, dirs: Sequence[str], stores) -> SphinxError:
  """The error for a non-finite chunk: the first input holding non-finite values there, else the weights.

  Only runs on failure, so the inputs are read again rather than checked on every chunk: any non-finite
  input makes the float32 result non-finite, so checking the result alone catches both causes."""
  for d, store in zip(dirs, stores):
    if not _all_finite(store[region].read().result()):
      return SphinxError(f"mix: non-finite values in {leaf} [{_region_text(region)}] of {d}; {REPAIR}.")
  return SphinxError(f"mix: non-finite values in {leaf} [{_region_text(region)}] of the result; the weights "
                     "overflow this leaf's dtype; use smaller ones.")


def _leaf_stream(leaf: str, shape, mixed: bool, recipe: Recipe, progress) -> checkpoint.StreamedLeaf:
  """A StreamedLeaf whose chunks read the same region of every input and combine (or copy) it."""
  floating = jnp.issubdtype(shape.dtype, jnp.floating)  # jnp's test knows bfloat16
  if mixed and not floating:
    raise SphinxError(f"mix: {leaf} is {shape.dtype}, not floating point; leave it out of --include.")
  # Inputs, then the base if any; a copied leaf reads the first input only.
  dirs = (list(recipe.inputs) + ([recipe.base] if recipe.base else [])) if mixed else [recipe.inputs[0]]
  stores = [checkpoint.open_leaf(Path(d) / checkpoint.PARAMS_DIR, leaf) for d in dirs]
  # Mixed leaves are read as float32: TensorStore converts while it decodes, in its own threads.
  sources = [ts.cast(s, ts.float32) if mixed and shape.dtype != np.float32 else s for s in stores]

  def fill(region):
    reads = [source[region].read() for source in sources]  # all issued first, so they decode in parallel
    arrays = [r.result() for r in reads]
    if mixed:
      n = len(recipe.inputs)
      with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below, naming the leaf
        values = combine(arrays[:n], recipe.weights, arrays[n] if recipe.base else None).astype(shape.dtype, copy=False)
    else:
      values = arrays[0]
    if floating and not _all_finite(values):
      raise _blame(leaf, region, dirs, stores)
    progress.update(values.nbytes)
    return values

  return checkpoint.StreamedLeaf(tuple(shape.shape), shape.dtype, fill)


def mix(out, recipe: Recipe, allow_any_weights: bool = False, overwrite: bool = False,
        chunk_bytes: int = checkpoint.CHUNK_BYTES) -> Path:
  """Writes the mix of `recipe` as a model directory at `out` (config and tokenizer of the first input)."""
  from tqdm import tqdm

  check_weights(recipe, allow_any_weights)
  shapes = check_inputs(recipe)
  checkpoint.check_destination(out, overwrite)
  chosen = selected(list(shapes), recipe.include)
  total = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in shapes.values())
  with tqdm(total=total, unit="B", unit_scale=True, desc="mix", file=sys.stderr, dynamic_ncols=True) as bar:
    leaves = {leaf: _leaf_stream(leaf, s, leaf in chosen, recipe, bar) for leaf, s in shapes.items()}
    return checkpoint.save_streamed_model_dir(
        out, leaves, checkpoint.read_config(recipe.inputs[0]), checkpoint.tokenizer_path(recipe.inputs[0]),
        metadata=recipe.provenance(), overwrite=overwrite, chunk_bytes=chunk_bytes)


# ------------------------------------------------------------------------------------------------- CLI
def add_mix_parser(subparsers):
  p = subparsers.add_parser("mix", help="mix model directories: weighted average, interpolation, task arithmetic")
  p.add_argument("--out", required=True, help="destination model directory (must not exist or be empty)")
  p.add_argument("--inputs", nargs="+", required=True, help="model directories of one model")
  p.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per input")
  p.add_argument("--base", default=None, help="task arithmetic: out = base + sum(w_i * (input_i - base))")
  p.add_argument("--include", nargs="+", default=list(DEFAULT_INCLUDE),
                 help="regexes over leaf paths to mix (default: llm/.*); the rest is copied from the first input")
  p.add_argument("--allow-any-weights", action="store_true", help="allow negative weights and sums other than 1")
  p.add_argument("--overwrite", action="store_true", help="replace --out once the new directory is complete")
  p.set_defaults(func=run)


def run(args) -> int:
  recipe = Recipe(tuple(args.inputs), tuple(args.weights), args.base, tuple(args.include))
  out = mix(args.out, recipe, allow_any_weights=args.allow_any_weights, overwrite=args.overwrite)
  print(out)
  return 0
