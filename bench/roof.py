"""The machine's matmul roof, measured inside a benchmark's own interleaved rounds (bench/timing.py `fastest`):
an n x n x n GEMM by XLA (jit) and by PyTorch, full-precision f32 on both sides (XLA precision 'highest'; torch
TF32 off is the caller's setting), the faster of the two is the roof. Shared by bench/towers.py and
bench/train.py."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NAMES = ("xla GEMM", "torch GEMM")


def gemms(dtype: str, n: int) -> dict[str, Callable]:
  """The roof candidates: an n^3 GEMM in `dtype` by XLA (jit) and by torch, to run among the timed contenders."""
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  ja = jnp.asarray(a, jnp.dtype(dtype))
  dot = jax.jit(lambda x: jnp.dot(x, x, precision="highest"))
  ta = torch.from_numpy(a).to(TORCH_DTYPES[dtype])
  return {"xla GEMM": lambda: dot(ja).block_until_ready(), "torch GEMM": lambda: torch.mm(ta, ta)}


def roof(best: dict[str, tuple[float, float]], n: int) -> tuple[float, str]:
  """(FLOP/s, name) of the faster GEMM in a `fastest` result that timed `gemms(dtype, n)`."""
  name = min(NAMES, key=lambda k: best[k][0])
  return 2 * n ** 3 / best[name][0], name
