"""The host allocator: the `sphinx-jax` program (and the benchmarks) restart themselves once on jemalloc, set to
keep freed memory mapped, where the library is installed (setup.sh fetches Debian's `libjemalloc2` into the
virtual environment when the system has none).

Why: XLA CPU allocates an executable's temporaries as one block afresh on every run (the demo's train step:
169 MB) and frees it after. glibc serves a block that large with mmap from the executing thread and unmaps it on
free; its tunables cannot keep it (thread arenas fall back to mmap above 64 MB whatever `mmap_max` says), so every
demo step faulted in ~41,000 fresh 4 KiB pages, ~19% of the demo's CPU time. jemalloc with the configuration
below reuses the block: ~20 faults per step and the demo's step ~1.2x faster (NOTES.md, sixteenth session).
Preloading jemalloc with large blocks kept and decay off is a common recipe for CPU training (PyTorch's CPU
performance guides give a similar `MALLOC_CONF`).

The allocator must be in place before the first allocation, so the process replaces itself (execve: same process
id, arguments and environment, plus LD_PRELOAD and MALLOC_CONF); the LD_PRELOAD it then carries ends the restarts.
Opt out with SPHINX_JAX_ALLOCATOR=system. On an accelerator only the host's allocations change.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

OPT_OUT = "SPHINX_JAX_ALLOCATOR"
LIBRARY = "libjemalloc.so.2"
# oversize_threshold:0 - no separate arena for large blocks (jemalloc purges that one at once);
# dirty/muzzy decay -1 - freed pages stay mapped for reuse (the process's footprint stays at its peak).
JEMALLOC_CONF = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# allocators a user may have preloaded already; theirs stands
PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def allocator_library(prefix: str = sys.prefix) -> str | None:
  """jemalloc's shared library: the virtual environment's copy (`PREFIX/lib/libjemalloc.so.2`, from setup.sh),
  else the system's (its soname, which the dynamic loader resolves); None where there is neither."""
  bundled = Path(prefix) / "lib" / LIBRARY
  if bundled.is_file():
    return str(bundled)
  return LIBRARY if ctypes.util.find_library("jemalloc") == LIBRARY else None


def allocator_environ(environ, library: str | None) -> dict | None:
  """The environment to restart with (environ plus LD_PRELOAD and, unless set, MALLOC_CONF), or None when there
  is no library, the user opted out, or an allocator is preloaded already (which also ends the restart)."""
  preload = environ.get("LD_PRELOAD", "")
  if library is None or environ.get(OPT_OUT, "") == "system" or any(a in preload for a in PRELOADED_ALLOCATORS):
    return None
  return {**environ, "LD_PRELOAD": f"{library}:{preload}" if preload else library,
          "MALLOC_CONF": environ.get("MALLOC_CONF", JEMALLOC_CONF)}


def loaded_allocator() -> str:
  """'jemalloc' when this process runs on it, else 'system' (what benchmarks print beside their numbers)."""
  try:
    maps = Path("/proc/self/maps").read_text()
  except OSError:
    return "system"
  return "jemalloc" if "libjemalloc" in maps else "system"


def restart_with_allocator():
  """Replaces this process by the same command on jemalloc when `allocator_environ` asks for it. Call first thing
  in a program's entry point, before threads start (JAX's, Grain's)."""
  environ = allocator_environ(os.environ, allocator_library())
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)
