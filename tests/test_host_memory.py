"""sphinx_jax/host_memory.py: the restart on jemalloc, and that it keeps a large block mapped across frees, which
is what an XLA CPU step's temporaries need (one block allocated and freed per run, from an executor thread)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sphinx_jax import host_memory

BLOCK_PAGES = (64 << 20) // 4096
ROUNDS = 16
# Restarts on the allocator, then mallocs, touches and frees a 64 MiB block ROUNDS times through libc's symbols
# from a second thread (glibc maps a block that large afresh each time; numpy is no probe, it advises huge pages
# on its own), and prints: pid, the allocator it runs on, minor page faults of the loop.
FAULTS_SCRIPT = textwrap.dedent(f"""
    import ctypes, os, resource, threading
    from sphinx_jax import host_memory
    host_memory.restart_with_allocator()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def churn():
      for _ in range({ROUNDS}):
        block = libc.malloc(64 << 20)
        ctypes.memset(block, 1, 64 << 20)
        libc.free(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    thread = threading.Thread(target=churn)
    thread.start()
    thread.join()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(os.getpid(), host_memory.loaded_allocator(), faults)
""")


def test_environ_preloads_the_library_once():
  env = host_memory.allocator_environ({"PATH": "/bin"}, "/venv/lib/libjemalloc.so.2")
  assert env == {"PATH": "/bin", "LD_PRELOAD": "/venv/lib/libjemalloc.so.2", "MALLOC_CONF": host_memory.JEMALLOC_CONF}
  # the restarted process carries the preload, which ends the restarts
  assert host_memory.allocator_environ(env, "/venv/lib/libjemalloc.so.2") is None
  kept = host_memory.allocator_environ({"LD_PRELOAD": "libfoo.so", "MALLOC_CONF": "narenas:2"}, "libjemalloc.so.2")
  assert kept["LD_PRELOAD"] == "libjemalloc.so.2:libfoo.so" and kept["MALLOC_CONF"] == "narenas:2"


@pytest.mark.parametrize("environ,library", [
    ({}, None),  # no jemalloc on this system
    ({"SPHINX_JAX_ALLOCATOR": "system"}, "libjemalloc.so.2"),
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}, "libjemalloc.so.2"),  # the user's own allocator stands
])
def test_no_restart_without_library_or_when_declined(environ, library):
  assert host_memory.allocator_environ(environ, library) is None


def test_library_prefers_the_environments_copy(tmp_path, monkeypatch):
  monkeypatch.setattr(host_memory.ctypes.util, "find_library", lambda name: None)
  assert host_memory.allocator_library(str(tmp_path)) is None
  (tmp_path / "lib").mkdir()
  (tmp_path / "lib" / host_memory.LIBRARY).write_bytes(b"")
  assert host_memory.allocator_library(str(tmp_path)) == str(tmp_path / "lib" / host_memory.LIBRARY)


def _thp_always() -> bool:
  """Under THP mode 'always' the kernel maps glibc's fresh 64 MiB blocks in 2 MiB pages: few faults either way."""
  try:
    return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
  except OSError:
    return False


def _run_faults(tmp_path, **extra_env):
  script = tmp_path / "faults.py"
  script.write_text(FAULTS_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
  env.update(extra_env)
  process = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 0
  pid, allocator, faults = out.split()
  return process.pid, int(pid), allocator, int(faults)


@pytest.mark.skipif(host_memory.allocator_library() is None,
                    reason="no jemalloc here (setup.sh fetches Debian's libjemalloc2 where apt-get works)")
def test_restart_keeps_the_process_and_maps_the_block_once(tmp_path):
  launched, pid, allocator, faults = _run_faults(tmp_path)
  assert pid == launched and allocator == "jemalloc"
  _, _, declined, system_faults = _run_faults(tmp_path, SPHINX_JAX_ALLOCATOR="system")
  assert declined == "system"
  # glibc faults the block in on every round, jemalloc on the first only
  if not _thp_always():
    assert system_faults > (ROUNDS - 1) * BLOCK_PAGES, system_faults
  assert faults < 2 * BLOCK_PAGES, faults
