"""PyTorch-compatible in-model resamplers: `F.interpolate` bicubic (align_corners=False, antialias=False) and
legacy 'nearest', as jit-able jnp functions with static sizes, plus the original's fp16 round trip.

Mirrors ATen's CPU upsample kernels (torch 2.14, `UpSample.h` / `cpu/UpSampleKernel.cpp`):
  scale     = in / out for `size=`; 1 / scale_factor when a scale factor is passed (DINOv2's 37 -> 16 table
              uses scale_factor 16.1/37, so source coordinates step by 37/16.1, not 37/16). fp32.
  nearest   src = min(floor(dst * scale), in - 1)                       ('nearest', not 'nearest-exact')
  bicubic   src = scale * (dst + 0.5) - 0.5, i = floor(src), t = src - i, taps i-1 .. i+2 clamped to the
            border, Keys cubic with a = -0.75 (`jax.image.resize` uses a = -0.5 and antialiasing instead).
Shapes: any array; `axes` names the two spatial axes (default NHWC (1, 2)). Out: same rank, those axes resized.

fp16 (`half=True`): SPHINX calls `F.interpolate(x.half(), ...)` and casts back. torch's CPU kernel then stores
the cubic weights in fp16, accumulates in fp32 (`opmath`) and rounds the result to fp16; `half=True` does the
same. The fp32 sums differ from ATen's in the last bit now and then (FMA placement), which moves < 2e-5 of the
fp16 results by one ulp (tests/test_resize.py). Nearest only selects: there fp16 is just the input rounding.
Only torch's CPU kernel was checked (the original ran on CUDA, whose kernel was not available here).

`jax.image.resize` is deliberately not used (different kernel, antialias, half-pixel nearest).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from sphinx_jax.errors import SphinxError

CUBIC_A = -0.75  # torch's bicubic constant for antialias=False (OpenCV's choice)


def round_fp16(x):
  """x rounded to float16 and cast back to x's dtype: the original's `.half()` ... `.to(dtype)` pair."""
  return x.astype(jnp.float16).astype(x.dtype)


def _pair(value, what):
  if value is None:
    return (None, None)
  if isinstance(value, (int, float)):
    return (value, value)
  if len(value) != 2:
    raise SphinxError(f"resize: {what} must be a number or a pair, got {value!r}.")
  return tuple(value)


def _scale(in_size: int, out_size: int, scale_factor) -> np.float32:
  """ATen `area_pixel_compute_scale` (align_corners=False), in fp32 like its opmath."""
  if scale_factor is not None and scale_factor > 0:
    return np.float32(1.0 / scale_factor)  # 1/scale in double, then cast, as ATen does
  return np.float32(in_size) / np.float32(out_size)


def _check_size(in_size, out_size, scale_factor):
  if out_size < 1:
    raise SphinxError(f"resize: output size {out_size} must be >= 1.")
  if scale_factor is not None and int(np.floor(in_size * scale_factor)) != out_size:
    raise SphinxError(f"resize: scale_factor {scale_factor} maps {in_size} to "
                      f"{int(np.floor(in_size * scale_factor))}, not the requested {out_size}; "
                      "pass the size torch would compute, floor(in * scale_factor).")


def nearest_indices(in_size: int, out_size: int, scale_factor=None) -> np.ndarray:
  """int32[out]: torch legacy 'nearest' source index per output index. 224 -> 256: [0, 0, 1, 2, ..., 223]."""
  _check_size(in_size, out_size, scale_factor)
  scale = _scale(in_size, out_size, scale_factor)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1).astype(np.int32)


def _cubic_near(x, a):  # |x| <= 1
  return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x, a):  # 1 < |x| < 2
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def cubic_taps(in_size: int, out_size: int, scale_factor=None):
  """(int32[out, 4] border-clamped source indices, float32[out, 4] weights) for one axis, in fp32 as ATen.

  Example: 448 -> 224 has t = 0.5 everywhere, weights (-0.09375, 0.59375, 0.59375, -0.09375).
  """
  _check_size(in_size, out_size, scale_factor)
  f32 = np.float32
  scale = _scale(in_size, out_size, scale_factor)
  src = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
  base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  t = np.clip(src - base.astype(f32), f32(0), f32(1))
  a = f32(CUBIC_A)
  one = f32(1)
  weights = np.stack([_cubic_far(t + one, a), _cubic_near(t, a), _cubic_near(one - t, a),
                      _cubic_far((one - t) + one, a)], axis=1).astype(f32)
  idx = np.clip(base[:, None] + np.arange(-1, 3), 0, in_size - 1).astype(np.int32)
  return idx, weights


def _weighted_taps(x, axis, idx, weights):
  """sum_k weights[:, k] * x[idx[:, k]] along `axis`, in fp32.

  ATen's compiled loop computes fma(x3, w3, fma(x2, w2, fma(x0, w0, x1 * w1))) (matched bit for bit on torch
  2.14 in a numpy emulation). XLA's CPU backend fuses multiply-adds too, but always rounds x0 * w0 and fuses
  x1 * w1, whatever the source order or an optimization barrier; hence the rare last-bit differences.
  """
  shape = [1] * x.ndim
  shape[axis] = idx.shape[0]

  def term(k):
    return jnp.take(x, jnp.asarray(idx[:, k]), axis=axis), jnp.asarray(weights[:, k]).reshape(shape)

  (x0, w0), (x1, w1), (x2, w2), (x3, w3) = (term(k) for k in range(4))
  out = x1 * w1
  out = x0 * w0 + out
  out = x2 * w2 + out
  return x3 * w3 + out


def bicubic(x, out_hw: Sequence[int], *, scale_factor=None, axes: Sequence[int] = (1, 2), half: bool = False):
  """torch `F.interpolate(mode="bicubic", align_corners=False, antialias=False)` on two axes of x.

  Args:
    x: float array; `axes` are its (height, width) axes (NHWC default; (2, 3) for NCHW).
    out_hw: (out_h, out_w), static ints.
    scale_factor: None (torch's `size=` semantics) or a number / pair as passed to torch's `scale_factor=`;
      then out_hw must be floor(in * scale_factor), and the coordinate scale is 1 / scale_factor.
    half: emulate `F.interpolate(x.half(), ...).to(x.dtype)` on the CPU (weights and result in fp16).
  Returns: x's dtype, axes resized. Computed in fp32 (H is the outer sum, W the inner, as ATen).
  """
  h_axis, w_axis = (a % x.ndim for a in axes)
  sf_h, sf_w = _pair(scale_factor, "scale_factor")
  h_idx, h_w = cubic_taps(x.shape[h_axis], int(out_hw[0]), sf_h)
  w_idx, w_w = cubic_taps(x.shape[w_axis], int(out_hw[1]), sf_w)
  dtype = x.dtype
  y = x.astype(jnp.float32)
  if half:
    y = round_fp16(y)
    h_w, w_w = (w.astype(np.float16).astype(np.float32) for w in (h_w, w_w))
  y = _weighted_taps(_weighted_taps(y, w_axis, w_idx, w_w), h_axis, h_idx, h_w)
  if half:
    y = round_fp16(y)
  return y.astype(dtype)


def nearest(x, out_hw: Sequence[int], *, scale_factor=None, axes: Sequence[int] = (1, 2), half: bool = False):
  """torch `F.interpolate(mode="nearest")` (legacy floor indexing) on two axes of x.

  `half` rounds x to fp16 first, as `F.interpolate(x.half(), ...).to(x.dtype)`; selection is exact after that.
  Returns: x's dtype, axes resized.
  """
  h_axis, w_axis = (a % x.ndim for a in axes)
  sf_h, sf_w = _pair(scale_factor, "scale_factor")
  y = round_fp16(x) if half else x
  y = jnp.take(y, jnp.asarray(nearest_indices(x.shape[h_axis], int(out_hw[0]), sf_h)), axis=h_axis)
  return jnp.take(y, jnp.asarray(nearest_indices(x.shape[w_axis], int(out_hw[1]), sf_w)), axis=w_axis)
