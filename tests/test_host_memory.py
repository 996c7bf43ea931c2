"""sphinx_jax/host_memory.py: the restart with glibc's huge-page tunable, and that it removes the page faults of
large, short-lived allocations (what an XLA CPU step's temporaries are)."""
import os
import subprocess
import sys
import textwrap

import pytest

from sphinx_jax import host_memory

# Mallocs, touches and frees a 64 MiB block 8 times through libc itself (glibc maps blocks this large afresh each
# time; numpy is no probe, it advises huge pages on its own), then prints: pid, GLIBC_TUNABLES, minor page faults
# of the loop.
FAULTS_SCRIPT = textwrap.dedent("""
    import ctypes, os, resource
    from sphinx_jax import host_memory
    host_memory.restart_with_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
      block = libc.malloc(64 << 20)
      ctypes.memset(block, 1, 64 << 20)
      libc.free(block)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), faults)
""")


def test_environ_gets_the_tunable_once():
  env = host_memory.huge_page_environ({"PATH": "/bin"}, "madvise", (2, 36))
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  # the restarted process sees the tunable and stops there
  assert host_memory.huge_page_environ(env, "madvise", (2, 36)) is None
  kept = host_memory.huge_page_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 40))
  assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ,mode,glibc", [
    ({}, "always", (2, 36)),  # the kernel already uses huge pages
    ({}, "never", (2, 36)),
    ({}, "", (2, 36)),  # no THP (or not Linux)
    ({}, "madvise", (2, 34)),  # glibc without the tunable
    ({}, "madvise", None),  # musl, macOS
    ({"SPHINX_JAX_HUGE_PAGES": "0"}, "madvise", (2, 36)),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36)),  # the user's own choice stands
])
def test_no_restart_where_it_would_change_nothing_or_is_declined(environ, mode, glibc):
  assert host_memory.huge_page_environ(environ, mode, glibc) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(str(path)) == "madvise"
  assert host_memory.thp_mode(str(tmp_path / "missing")) == ""


def _run_faults(tmp_path, **extra_env):
  script = tmp_path / "faults.py"
  script.write_text(FAULTS_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.update(extra_env)
  process = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
  out, _ = process.communicate(timeout=120)
  assert process.returncode == 0
  pid, *tunables, faults = out.split()
  return process.pid, int(pid), tunables, int(faults)


@pytest.mark.skipif(host_memory.huge_page_environ({}, host_memory.thp_mode(), host_memory.glibc_version()) is None,
                    reason="needs THP mode 'madvise' and glibc >= 2.35")
def test_restart_keeps_the_process_and_removes_page_faults(tmp_path):
  launched, pid, tunables, faults = _run_faults(tmp_path)
  assert pid == launched and tunables == [host_memory.TUNABLE]
  _, _, declined, base_faults = _run_faults(tmp_path, SPHINX_JAX_HUGE_PAGES="0")
  assert declined == []
  # 8 x 64 MiB in 4 KiB pages is 131072 faults; in 2 MiB pages 256
  assert base_faults > 100_000 and faults < base_faults / 20, (faults, base_faults)
