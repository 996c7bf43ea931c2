"""The `sphinx-jax` command (also `python -m sphinx_jax`).

Each subcommand lives in its own module and registers through `SUBCOMMANDS`: name -> "module:add_parser".
`add_parser(subparsers)` adds the subparser and sets `func(args) -> int`. A `SphinxError` becomes one line
on stderr and exit code 2. Commands that take config overrides (`--config.a.b=value`, any number) set
`overrides=True` as a parser default and find them in `args.overrides`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from sphinx_jax import host_memory
from sphinx_jax.errors import SphinxError

SUBCOMMANDS = {
    "compile": "sphinx_jax.compile:add_compile_parser",
    "prepare": "sphinx_jax.data.prepare:add_parser",
    "convert": "sphinx_jax.convert.cli:add_convert_parser",
    "inspect": "sphinx_jax.convert.cli:add_inspect_parser",
    "train": "sphinx_jax.train.cli:add_train_parser",
    "generate": "sphinx_jax.inference.cli:add_generate_parser",
    "mix": "sphinx_jax.mixing:add_mix_parser",
    "export": "sphinx_jax.train.export:add_export_parser",
    "eval": "sphinx_jax.eval.runner:add_eval_parser",
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="sphinx-jax", description="SPHINX in JAX/Flax")
  subparsers = parser.add_subparsers(dest="command", required=True)
  for name, target in SUBCOMMANDS.items():
    module_name, function = target.split(":")
    getattr(importlib.import_module(module_name), function)(subparsers)
  return parser


def run() -> int:
  """The `sphinx-jax` program: `main` on the command line, in a process on the host allocator of `host_memory`."""
  host_memory.restart_with_allocator()
  return main()


def main(argv=None) -> int:
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if getattr(args, "overrides", False):
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
      parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = extra
  elif extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  try:
    return int(args.func(args) or 0)
  except SphinxError as error:
    print(f"sphinx-jax {args.command}: error: {error}", file=sys.stderr)
    return 2
