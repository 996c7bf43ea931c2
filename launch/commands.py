"""Shared by the launchers: a command is a list of argv words; `execute` prints it (--dry-run) or runs it."""
from __future__ import annotations

import shlex
import subprocess
import sys


def render(argv: list[str]) -> str:
  return " ".join(shlex.quote(word) for word in argv)


def execute(commands: list[list[str]], dry_run: bool) -> int:
  """Prints each command; runs them in order unless dry_run, stopping at the first failure."""
  for argv in commands:
    print(render(argv), flush=True)
    if not dry_run:
      code = subprocess.call(argv)
      if code:
        print(f"launch: command failed with exit code {code}: {render(argv)}", file=sys.stderr)
        return code
  return 0
