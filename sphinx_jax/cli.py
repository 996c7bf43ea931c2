"""The `sphinx-jax` command (also `python -m sphinx_jax`).

Each subcommand lives in its own module and registers through `SUBCOMMANDS`: name -> "module:add_parser".
`add_parser(subparsers)` adds the subparser and sets `func(args) -> int`. A `SphinxError` becomes one line
on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from sphinx_jax.errors import SphinxError

SUBCOMMANDS = {
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="sphinx-jax", description="SPHINX in JAX/Flax")
  subparsers = parser.add_subparsers(dest="command", required=True)
  for name, target in SUBCOMMANDS.items():
    module_name, function = target.split(":")
    getattr(importlib.import_module(module_name), function)(subparsers)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except SphinxError as error:
    print(f"sphinx-jax {args.command}: error: {error}", file=sys.stderr)
    return 2
