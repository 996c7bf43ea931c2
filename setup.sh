#!/usr/bin/env bash
# Creates .venv and installs sphinx_jax. `bash setup.sh` = the JAX runtime only (enough for the demo,
# training, generation and Orbax-side tools); `bash setup.sh --test` adds the PyTorch references and
# converters' torch side plus pytest (~6 GB: torch 2.14.1 + torchvision 0.29.1, see ../shared/REFERENCES.md).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
py=.venv/bin/python
$py -m pip install -q --upgrade pip
$py -m pip install -q -r requirements.txt
if [ "${1:-}" = "--test" ]; then
  $py -m pip install -q -r requirements-torch.txt
  # Reference code whose declared pins would drag in other torch builds (open_clip 2.24 predates the
  # batch-first change the original code relies on; dinov2 pins torch 2.0 and xformers).
  $py -m pip install -q --no-deps -r requirements-nodeps.txt
fi
$py -m pip install -q --no-deps -e .

# jemalloc for the host allocator (sphinx_jax/host_memory.py): Debian's libjemalloc2 copied into .venv/lib when
# the system has none. Best effort: without it sphinx-jax runs on glibc's allocator, its CPU steps ~1.2x slower.
install_jemalloc() {
  if [ -f .venv/lib/libjemalloc.so.2 ] || ldconfig -p 2>/dev/null | grep -q 'libjemalloc\.so\.2 '; then
    return 0
  fi
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
  local tmp status
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -q libjemalloc2 >/dev/null 2>&1) &&
    dpkg-deb -x "$tmp"/libjemalloc2_*.deb "$tmp/root" &&
    cp "$(find "$tmp/root" -name libjemalloc.so.2 | head -n 1)" .venv/lib/libjemalloc.so.2.part &&
    mv .venv/lib/libjemalloc.so.2.part .venv/lib/libjemalloc.so.2
  status=$?
  rm -rf "$tmp" .venv/lib/libjemalloc.so.2.part
  return $status
}
install_jemalloc || echo "setup.sh: jemalloc not installed (needs apt-get and a Debian or Ubuntu archive);" \
  "sphinx-jax runs on glibc's allocator, its CPU steps ~1.2x slower (sphinx_jax/host_memory.py)."
