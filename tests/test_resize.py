"""sphinx_jax.models.vision.resize against torch.nn.functional.interpolate (CPU, the installed torch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sphinx_jax.errors import SphinxError
from sphinx_jax.models.vision import resize

# SPHINX's in-model resizes (SPHINX.md §3.3, §4) and DINOv2's position table (§3.5), then a few others.
BICUBIC_CASES = [((448, 448), (224, 224)), ((1024, 1024), (224, 224)), ((1024, 1024), (448, 448)),
                 ((1024, 1024), (512, 512)), ((30, 47), (47, 20)), ((20, 9), (13, 33)), ((5, 5), (17, 17))]


def _image(hw, seed, channels=3, batch=2):
  return torch.randn(batch, channels, *hw, generator=torch.Generator().manual_seed(seed))


def _ours(fn, x, out_hw, **kw):
  """Runs a resizer jitted on the NHWC copy of an NCHW torch tensor; returns NCHW numpy."""
  nhwc = jnp.asarray(x.permute(0, 2, 3, 1).numpy())
  out = jax.jit(lambda v: fn(v, out_hw, **kw))(nhwc)
  return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("in_hw,out_hw", BICUBIC_CASES)
def test_bicubic_matches_torch_fp32(in_hw, out_hw):
  x = _image(in_hw, seed=sum(in_hw))
  want = F.interpolate(x, size=out_hw, mode="bicubic", align_corners=False).numpy()
  np.testing.assert_allclose(_ours(resize.bicubic, x, out_hw), want, rtol=0, atol=1e-5)


def test_bicubic_scale_factor_semantics_dinov2_table():
  """37 -> 16 with scale_factor 16.1/37: torch steps by 37/16.1; size semantics (37/16) would differ."""
  x = _image((37, 37), seed=3, channels=8, batch=1)
  sf = (16 + 0.1) / 37
  want = F.interpolate(x, scale_factor=(sf, sf), mode="bicubic", align_corners=False, antialias=False).numpy()
  assert want.shape[-2:] == (16, 16)
  ours = _ours(resize.bicubic, x, (16, 16), scale_factor=sf)
  np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5)
  by_size = _ours(resize.bicubic, x, (16, 16))
  assert np.abs(by_size - want).max() > 1e-2  # the two semantics really are different maps


def test_bicubic_on_other_axes_matches_nhwc():
  x = _image((24, 40), seed=5)
  nchw = jax.jit(lambda v: resize.bicubic(v, (11, 57), axes=(2, 3)))(jnp.asarray(x.numpy()))
  np.testing.assert_array_equal(np.asarray(nchw), _ours(resize.bicubic, x, (11, 57)))


@pytest.mark.parametrize("in_hw,out_hw", [((224, 224), (256, 256)), ((7, 13), (16, 5)), ((9, 9), (4, 4))])
def test_nearest_matches_torch_legacy_nearest_exactly(in_hw, out_hw):
  x = _image(in_hw, seed=11)
  want = F.interpolate(x, size=out_hw, mode="nearest").numpy()
  np.testing.assert_array_equal(_ours(resize.nearest, x, out_hw), want)


def test_nearest_224_to_256_indices_are_floor():
  np.testing.assert_array_equal(resize.nearest_indices(224, 256), np.floor(np.arange(256) * 224 / 256))


def test_nearest_fp16_path_bit_exact():
  """SPHINX's ConvNeXt input: F.interpolate(view.half(), size=(256, 256)) cast back to fp32."""
  x = _image((224, 224), seed=13)
  want = F.interpolate(x.half(), size=(256, 256)).float().numpy()
  np.testing.assert_array_equal(_ours(resize.nearest, x, (256, 256), half=True), want)


@pytest.mark.parametrize("in_hw,out_hw", [((224, 224), (256, 256)), ((1024, 1024), (224, 224)),
                                          ((1024, 1024), (448, 448)), ((448, 448), (224, 224)),
                                          ((1024, 1024), (512, 512))])
def test_bicubic_fp16_path_matches_torch_half(in_hw, out_hw):
  """torch's fp16 CPU bicubic: fp16 weights, fp32 accumulation, fp16 result (see resize.py).

  ATen's compiled loop fuses some multiply-adds (FMA) that XLA does not, so the fp32 sums can differ in the
  last bit and, rarely, round to the neighbouring fp16 value: at most one fp16 ulp, in < 2e-5 of the values.
  Measured on torch 2.14.1: fp32 cubic weights instead of fp16 ones miss ~20% of the values at 224 -> 256.
  """
  x = _image(in_hw, seed=17)
  want = F.interpolate(x.half(), size=out_hw, mode="bicubic", align_corners=False).numpy()
  ours = _ours(resize.bicubic, x, out_hw, half=True).astype(np.float16)
  ulps = np.abs(ours.view(np.int16).astype(np.int32) - want.view(np.int16).astype(np.int32))
  assert ulps.max() <= 1
  assert (ulps > 0).mean() < 2e-5


def test_round_fp16_is_half_cast():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64,)).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(resize.round_fp16(x)),
                                torch.from_numpy(np.array(x)).half().float().numpy())


def test_scale_factor_size_mismatch_is_rejected():
  with pytest.raises(SphinxError, match="floor"):
    resize.bicubic(jnp.zeros((1, 37, 37, 1)), (17, 17), scale_factor=16.1 / 37)
