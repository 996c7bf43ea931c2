"""`sphinx-jax convert` and `sphinx-jax inspect`.

convert --from KIND --to KIND SRC DST [--dtype bf16|fp32] [--scan/--no-scan] [--overwrite]
  Every kind has a reader (path -> `Model`: params tree, resolved config, tokenizer path, provenance) and a
  writer (`Model` -> directory); any reader pairs with any writer, so a new kind plugs in by adding one entry
  to `READERS` and `WRITERS`.
  hf     Hugging Face LlamaForCausalLM directory: config.json, safetensors (sharded or not) or
         pytorch_model*.bin, tokenizer.model. Text-only: the model config has `towers=()`.
  orbax  a sphinx_jax model directory (checkpoint.py): what `sphinx_jax.load` reads.
  accessory  a LLaMA2-Accessory SPHINX directory (convert/accessory.py): consolidated.XX-of-YY.model.pth,
         config.json, meta.json, tokenizer.model; `--to accessory --mp N` writes N model-parallel shards.
Tensors stream one at a time (tqdm counts them); output goes to a temporary sibling renamed into place at the
end, so a failure leaves nothing at DST. Bad input exits 2 with one line (cli.main turns SphinxError into it).

inspect PATH: prints the key / shape / dtype table of any checkpoint kind (convert/inspect.py).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm import tqdm

from sphinx_jax import checkpoint
from sphinx_jax import config as cfg
from sphinx_jax.convert import hf
from sphinx_jax.errors import SphinxError

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


class Model(NamedTuple):
  """What readers produce and writers consume: the whole model, host-side."""
  params: dict            # {"llm": ..., "towers": ..., "fusion": ...}; text-only models hold "llm" only
  config: Any             # resolved ConfigDict (config.model.llm, config.model.towers, ...)
  tokenizer: Path | None  # sentencepiece tokenizer.model to carry along
  provenance: dict        # source path and kind, recorded in the output's metadata


# ------------------------------------------------------------------------------------------- helpers
def cast_tree(params, dtype: str):
  """Casts floating leaves to `dtype` ('bfloat16' | 'float32'); integer leaves stay as they are."""
  target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
  return jax.tree.map(lambda a: a.astype(target) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def stored_dtype(params) -> str:
  """The widest floating dtype among the leaves, as a config name: float32 wins over bfloat16/float16."""
  names = {np.dtype(leaf.dtype).name for leaf in jax.tree.leaves(params)}
  for name in ("float32", "bfloat16", "float16"):
    if name in names:
      return name
  raise SphinxError(f"no floating-point parameters found (dtypes {sorted(names)}); not a model checkpoint.")


def set_layer_layout(llm_params: dict, n_layers: int, scan: bool) -> dict:
  """Decoder blocks as one scanned `layers/...` subtree (leading [L]) or as `layers_{i}/...`, other leaves kept."""
  if ("layers" in llm_params) == scan:
    return llm_params
  out = {k: v for k, v in llm_params.items() if k != "layers" and not k.startswith("layers_")}
  if scan:
    out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *[llm_params[f"layers_{i}"] for i in range(n_layers)])
  else:
    out.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], llm_params["layers"]) for i in range(n_layers)})
  return out


def text_only_config(llm, dtype: str):
  """A model config (configs/sphinx.py style) for a bare LLaMA decoder: no towers, compute in `dtype`."""
  model = cfg.model_config(llm, towers=(), image_size=None, views=1, dtype=dtype, param_dtype=dtype)
  model.variant = "llama"
  model.llama_type = "llama"  # accessory/model/LLM/llama.py, the plain decoder
  config = cfg.base_config(model)
  cfg.validate(config)
  return config


class Counted(Mapping):
  """A lazy tensor mapping that ticks a progress bar on every tensor read."""

  def __init__(self, source: Mapping, bar):
    self.source, self.bar = source, bar

  def __getitem__(self, key):
    value = self.source[key]
    self.bar.update(1)
    return value

  def __contains__(self, key):  # Mapping's default would read (and count) the tensor
    return key in self.source

  def __iter__(self):
    return iter(self.source)

  def __len__(self):
    return len(self.source)


def bar_iter(items, bar):
  """Passes `items` through, ticking `bar` per item."""
  for item in items:
    yield item
    bar.update(1)


def _progress(**kwargs):
  return tqdm(unit="tensor", file=sys.stderr, dynamic_ncols=True, **kwargs)


# ------------------------------------------------------------------------------------------- readers
def read_hf(src: Path, args) -> Model:
  from sphinx_jax.convert import torch_io  # torch is imported only by the commands that need it
  if not src.is_dir():
    raise SphinxError(f"{src}: no such directory; --from hf takes a Hugging Face model directory.")
  llm = hf.llm_config_from_hf(checkpoint.read_json(src / "config.json"))
  llm.scan_layers = True if args.scan is None else args.scan
  source = torch_io.open_hf_weights(src)
  with _progress(total=len(source), desc=f"reading {src.name}") as bar:
    params = {"llm": hf.params_from_hf(Counted(source, bar), llm, llm.scan_layers)}
  tokenizer = src / "tokenizer.model"
  return Model(params, text_only_config(llm, stored_dtype(params)), tokenizer if tokenizer.is_file() else None,
               {"source": str(src.absolute()), "source_kind": "hf"})


def read_orbax(src: Path, args) -> Model:
  params, config, tokenizer = checkpoint.load_model_dir(src)
  if args.scan is not None and args.scan != config.model.llm.scan_layers:
    params = dict(params, llm=set_layer_layout(params["llm"], config.model.llm.n_layers, args.scan))
    config.model.llm.scan_layers = args.scan
  return Model(params, config, tokenizer, {"source": str(src.absolute()), "source_kind": "orbax"})


# ------------------------------------------------------------------------------------------- writers
def write_hf(model: Model, dst: Path, args) -> None:
  from sphinx_jax.convert import torch_io
  if model.config.model.towers or set(model.params) != {"llm"}:
    raise SphinxError(f"{model.provenance['source']}: has vision towers {list(model.config.model.towers)}; a "
                      "Hugging Face LlamaForCausalLM holds the decoder only. Export to accessory instead.")
  llm = model.config.model.llm
  hf_config = dict(hf.hf_config_from_llm(llm), dtype=stored_dtype(model.params))
  with checkpoint.staged_dir(dst, args.overwrite) as tmp:
    checkpoint.write_json(tmp / "config.json", hf_config)
    with _progress(desc=f"writing {dst.name}") as bar:
      torch_io.save_safetensors_shards(tmp, bar_iter(hf.hf_from_params(model.params["llm"], llm), bar),
                                       max_shard_bytes=args.max_shard_bytes)
    if model.tokenizer is not None:
      shutil.copyfile(model.tokenizer, tmp / "tokenizer.model")


def write_orbax(model: Model, dst: Path, args) -> None:
  checkpoint.save_model_dir(dst, model.params, model.config, tokenizer=model.tokenizer,
                            metadata=dict(model.provenance, tool_command="convert"), overwrite=args.overwrite)


# ------------------------------------------------------------------ LLaMA2-Accessory (convert/accessory.py)
def read_accessory(src: Path, args) -> Model:
  from sphinx_jax.convert import accessory
  if args.target_kind == "orbax":  # streamed: the orbax writer reads, merges and stores one layer at a time
    leaves, config, tokenizer = accessory.stream_accessory(src, scan_layers=args.scan)
    params = checkpoint.unflatten(leaves)
  else:
    params, config, tokenizer = accessory.import_accessory(src, scan_layers=args.scan)
  return Model(params, config, tokenizer, {"source": str(src.absolute()), "source_kind": "accessory"})


def write_accessory(model: Model, dst: Path, args) -> None:
  from sphinx_jax.convert import accessory
  accessory.export_accessory(model.params, model.config, model.tokenizer, dst, mp=args.mp,
                             overwrite=args.overwrite)


READERS = {"hf": read_hf, "orbax": read_orbax, "accessory": read_accessory}
WRITERS = {"hf": write_hf, "orbax": write_orbax, "accessory": write_accessory}


# ------------------------------------------------------------------------------------------- commands
def run_convert(args) -> int:
  src, dst = Path(args.src), Path(args.dst)
  checkpoint.check_destination(dst, args.overwrite)  # before any reading: fail fast
  if not src.exists():
    raise SphinxError(f"{src}: no such file or directory; check SRC.")
  if src.absolute() == dst.absolute():
    raise SphinxError(f"{dst}: SRC and DST are the same; write to a new directory.")
  model = READERS[args.source_kind](src, args)
  if args.dtype:
    dtype = DTYPES[args.dtype]
    model.config.model.dtype = model.config.model.param_dtype = dtype
    model = model._replace(params=cast_tree(model.params, dtype))
  if model.tokenizer is None:
    print(f"note: {src} has no tokenizer.model; {dst} will have none.", file=sys.stderr)
  WRITERS[args.target_kind](model, dst, args)
  print(f"wrote {dst} ({args.target_kind})")
  return 0


def run_inspect(args) -> int:
  from sphinx_jax.convert.inspect import inspect
  for line in inspect(args.path):
    print(line)
  return 0


def add_convert_parser(subparsers) -> None:
  p = subparsers.add_parser("convert", help="convert a checkpoint between accessory, hf and orbax (sphinx_jax) formats",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--from", dest="source_kind", required=True, choices=sorted(READERS))
  p.add_argument("--to", dest="target_kind", required=True, choices=sorted(WRITERS))
  p.add_argument("src", help="source checkpoint directory")
  p.add_argument("dst", help="destination directory (must not exist or be empty, unless --overwrite)")
  p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating parameters on the way (default: keep)")
  p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=None,
                 help="decoder layers stacked for nn.scan (default: hf sources scan, orbax sources keep theirs)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST once the new one is complete")
  p.add_argument("--max-shard-bytes", type=int, default=4 * 2**30, help="safetensors shard size for --to hf")
  p.add_argument("--mp", type=int, default=1, help="model-parallel shards written by --to accessory")
  p.set_defaults(func=run_convert)


def add_inspect_parser(subparsers) -> None:
  p = subparsers.add_parser("inspect", help="print the key/shape/dtype table of any checkpoint")
  p.add_argument("path", help="an orbax model dir, HF dir, LLaMA2-Accessory dir, or a .safetensors/.pth file")
  p.set_defaults(func=run_inspect)
