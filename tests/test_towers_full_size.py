"""A real photo through the padded resize and all four towers at full size (bf16, random weights) on this CPU,
within 12 GiB: the shapes SPHINX.md §3 gives and finite values. Runs in a subprocess to measure its peak RSS."""
import json
import resource
import subprocess
import sys

import pytest

SCRIPT = r"""
import gc, json, resource
import jax, jax.numpy as jnp, numpy as np
from flax import linen as nn
from PIL import Image
from skimage import data as photos
from configs.sphinx import variant_config
from sphinx_jax.data import image as image_data
from sphinx_jax.models.sphinx import Towers, model_images, tower_views

model = variant_config("sphinx").model            # 224 px, 1 view, all four towers at full size
pixels = image_data.padded_resize(Image.fromarray(photos.coffee()), model.image_size)[None]   # 400x600 photo
small, large = tower_views(model_images(jnp.asarray(pixels)), model)
small, large = small[:, 0], large[:, 0]
rng = np.random.default_rng(0)
outputs, total = {}, 0
for name in ("clip", "convnext", "dinov2", "qformer"):  # one tower at a time: XLA's CPU bf16 dots upcast weights
  one = model.copy_and_resolve_references()
  one.towers = (name,)
  towers = Towers(one, jnp.bfloat16)
  shapes = nn.meta.unbox(jax.eval_shape(towers.init, jax.random.key(0), small, large)["params"])
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02, s.dtype), shapes)
  total += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  ensemble, queries = jax.jit(towers.apply)({"params": params}, small, large)
  outputs[name] = queries if name == "qformer" else ensemble
  del params
  gc.collect()
ensemble = jnp.concatenate([outputs[n] for n in ("clip", "convnext", "dinov2")], axis=-1)
queries = outputs["qformer"]
print(json.dumps(dict(params=total, ensemble=list(ensemble.shape), queries=list(queries.shape),
                      dtype=str(ensemble.dtype), finite=bool(jnp.isfinite(ensemble).all() & jnp.isfinite(queries).all()),
                      peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))
"""


@pytest.mark.heavy  # 3.4e9 bf16 parameters on the CPU; run on demand: pytest -m heavy
def test_real_photo_through_full_size_towers_in_bf16():
  root = __file__.rsplit("/tests/", 1)[0]
  out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True, timeout=3000)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  # CLIP visual (303,179,776 without proj and text leftovers) + ConvNeXt 843,398,016 + DINOv2 without mask_token
  # and the 37x37 table + BLIP-2 1,091,114,496 — about 3.37e9 parameters in bf16.
  assert 3.3e9 < result["params"] < 3.45e9
  assert result["ensemble"] == [1, 257, 1024 + 3072 + 1536] and result["queries"] == [1, 32, 768]
  assert result["dtype"] == "bfloat16" and result["finite"]
  assert result["peak_gib"] < 12, result
