"""Huge pages for the host allocator: the `sphinx-jax` program restarts itself once with glibc's
`glibc.malloc.hugetlb=1` tunable.

Why: XLA CPU allocates an executable's temporaries afresh on every run (the demo's train step: 169 MB). glibc
serves blocks that large with mmap and unmaps them when freed, so every step faulted in ~41,000 fresh 4 KiB pages:
0.08 s of system time per 0.2 s step on a 2-core machine. With the tunable, glibc (>= 2.35) advises transparent
huge pages for those mappings and a step takes ~500 faults (bench/train.py, BENCHMARKS.md). The kernel honours the
advice only in THP mode `madvise`; under `always` it uses huge pages unasked, under `never` not at all, so the
restart happens only under `madvise`. Tunables are read once when a process starts, hence the restart (execve:
same process id, arguments and environment plus the tunable). Accelerator runs lose nothing: only host
allocations change. Opt out with SPHINX_JAX_HUGE_PAGES=0.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "SPHINX_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)


def thp_mode(path: str = THP_MODE_FILE) -> str:
  """The kernel's transparent-huge-page mode, the bracketed word of `path` ('always [madvise] never' ->
  'madvise'); '' where the file is missing or unreadable (not Linux, THP not built)."""
  try:
    with open(path) as f:
      words = f.read().split()
  except OSError:
    return ""
  return next((w[1:-1] for w in words if w.startswith("[") and w.endswith("]")), "")


def glibc_version() -> tuple[int, ...] | None:
  """(2, 36) for glibc 2.36; None for another C library or platform."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  return tuple(int(p) for p in version.split(".") if p.isdigit())


def huge_page_environ(environ, mode: str, glibc: tuple[int, ...] | None) -> dict | None:
  """The environment to restart with (environ plus the tunable), or None when a restart would change nothing or
  was declined: opted out, THP mode not 'madvise', glibc missing or older than 2.35, or a hugetlb tunable
  already set (which also ends the restart)."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (environ.get(OPT_OUT, "1") == "0" or mode != "madvise" or glibc is None or glibc < MIN_GLIBC
      or "glibc.malloc.hugetlb=" in tunables):
    return None
  return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def restart_with_huge_pages():
  """Replaces this process by the same command with the tunable set, when `huge_page_environ` asks for it. Call
  first thing in a program's entry point, before threads start (JAX's, Grain's)."""
  environ = huge_page_environ(os.environ, thp_mode(), glibc_version())
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)
