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
