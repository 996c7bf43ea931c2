"""Helpers shared by the tower parity tests (test_clip, test_dinov2, test_eva) and bench/towers.py: SPHINX's own
torch forwards of CLIP and DINOv2, randomising every torch weight, state dicts torch <-> numpy bit-exactly, and
the project's tolerances."""
import jax
import numpy as np
import torch

from sphinx_jax.convert import torch_io

# The statistics exactly as llama_ens.py writes them (independent of the project's constants).
ORIGINAL_CLIP_MEAN, ORIGINAL_CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
ORIGINAL_DINOV2_MEAN, ORIGINAL_DINOV2_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

MAX_ABS = 1e-4   # tiny whole models, fp32 (REFERENCES.md §5)
REL_L2 = 1e-5


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter redrawn after construction, so no init constant (LayerScale 1e-6/1.0, LayerNorm 1/0,
  zero biases, the EVA qkv bias's zero k part, zero class tokens) can hide a mistake.

  Biases N(0, 0.2^2); norm scales and LayerScale gammas 1 + N(0, 0.2^2); matrices N(0, 1/fan_in); tables and
  tokens (positions, class / mask tokens, unused projections, logit scale) N(0, 0.5^2), so the positions
  weigh as much as the patches.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith("bias"):
        value = 0.2 * noise
      elif name.endswith(("weight", "gamma")) and p.ndim == 1:
        value = 1 + 0.2 * noise
      elif name.endswith("weight"):
        value = noise / np.sqrt(np.prod(p.shape[1:]))
      else:
        value = 0.5 * noise
      p.copy_(value.to(p.dtype))
  return module


def numpy_state(module: torch.nn.Module) -> dict:
  return {k: torch_io.to_numpy(v) for k, v in module.state_dict().items()}


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).numpy()


def assert_close(ours, reference: torch.Tensor):
  ours = np.asarray(ours, np.float64)
  ref = reference.detach().double().numpy()
  assert ours.shape == ref.shape
  max_abs = np.abs(ours - ref).max()
  rel_l2 = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
  assert max_abs <= MAX_ABS and rel_l2 <= REL_L2, (max_abs, rel_l2)


def assert_same_state(back: dict, module: torch.nn.Module):
  """Export equals the torch state dict: same keys, dtypes, shapes and bits."""
  state = module.state_dict()
  assert set(back) == set(state)
  for key, value in state.items():
    exported = torch_io.to_torch(back[key])
    assert exported.dtype == value.dtype and exported.shape == value.shape, key
    bits = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # bitwise, so -0.0 and NaN count too
    assert torch.equal(bits(exported), bits(value)), key


def run(module, params, images):
  """(features, intermediates) of a tower, jitted (eager op-by-op dispatch is slower on the CPU)."""
  return jax.jit(module.apply)({"params": params}, images)


def clip_encode_image(model, x):
  """SPHINX's `clip_encode_image` (llama_ens.py), step for step: all 257 tokens after ln_post, no proj."""
  v = model.visual
  x = v.conv1(x)
  x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
  x = torch.cat([v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], dim=1)
  x = x + v.positional_embedding.to(x.dtype)
  x = v.ln_pre(x)
  x = v.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # open_clip 2.24 blocks take (L, N, D)
  return v.ln_post(x)


def dinov2_input(x):
  """llama_ens.py's re-normalisation CLIP -> ImageNet, constants cast to the image dtype (`.to(image)`)."""
  view = lambda v: torch.Tensor(v).to(x).view(3, 1, 1)
  clip_mean, clip_std = view(ORIGINAL_CLIP_MEAN), view(ORIGINAL_CLIP_STD)
  return (x * clip_std + clip_mean - view(ORIGINAL_DINOV2_MEAN)) / view(ORIGINAL_DINOV2_STD)


def sphinx_dinov2_features(model, x):
  """What llama_ens.py feeds the fusion: re-normalise CLIP -> ImageNet, forward_features, [cls | patches]."""
  feats = model.forward_features(dinov2_input(x))
  return torch.cat([feats["x_norm_clstoken"].unsqueeze(1), feats["x_norm_patchtokens"]], dim=1)
