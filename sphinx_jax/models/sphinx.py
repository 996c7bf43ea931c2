"""The whole SPHINX model: views -> frozen towers -> fusion -> image tags -> LLaMA decoder.

Mirrors `encode_image` + `forward` / `forward_inference` of LLaMA2-Accessory's `accessory/model/LLM/llama_ens.py`
(SPHINX), `llama_ens5.py` (SPHINX-1k), `llama_ens_light.py` / `llama_ens5_light.py` (SPHINX-Tiny, -1k) and
`mixtral_sparse_ens.py` / `mixtral_sparse_ens5.py` (MoE); what differs between them is data in the config
(`towers`, `views`, `image_size`, `convnext.input_size`). Facts: SPHINX.md §3.6, §4; REFERENCES.md §2.

Letters: B batch, V views (1 or 5), S image side, T text tokens after BOS, M image positions (all views with
their start/end tags), D decoder width, C fused channels ([CLIP | ConvNeXt | DINOv2]), Q Q-Former tokens,
K vocabulary.
In:  tokens int[B, 1+T] ([BOS, t_1..t_T]), images float[B, S, S, 3] CLIP-normalised NHWC (uint8 pixels go
     through `model_images` first), has_image bool[B] (rows without an image in a batch that has images).
Out: `__call__` -> logits float[B, 1+T, K] aligned with `tokens` (`text_logits`); `prefill` / `decode` drive
     the KV-cached generation of inference/generate.py.

Sequence layout (the original's): [BOS, start_img, Q, 257, end_img, (x V views), t_1..t_T], positions 0.. over
all of it, causal everywhere. Mixed batches keep static shapes by giving every row the same M slots: a row
without an image puts them BEFORE its BOS as padding (segment 0, masked), so its BOS sits at slot M, where the
image rows have end_img. Then `h[:, M:]` lines up with [BOS, t_1..] for every row, and each row computes exactly
what it would alone (its positions restart at 0 on BOS). The towers still run on such rows' (dummy) images; put
text-only data in its own batches when that compute matters. Generation left-pads prompts the same way.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from sphinx_jax import sharding as sh
from sphinx_jax.config import image_tokens, patch_grid
from sphinx_jax.data import image as image_data
from sphinx_jax.errors import SphinxError
from sphinx_jax.models import layers
from sphinx_jax.models.llama import Llama
from sphinx_jax.models.vision import resize
from sphinx_jax.models.vision.blip2 import Blip2
from sphinx_jax.models.vision.clip import ClipVit
from sphinx_jax.models.vision.convnext import ConvNeXt
from sphinx_jax.models.vision.dinov2 import DinoV2

PROJ_EPS = 1e-5  # torch nn.LayerNorm default in visual_proj / qformer_proj
VIEW = 224  # the side every 224-px tower (Q-Former, CLIP, DINOv2) sees


# ------------------------------------------------------------------------------------------- pure helpers
def model_images(images, size: int | None = None):
  """What the model takes: uint8 pixels [B, S, S, 3] are CLIP-normalised here (on device, data/image.py's
  `normalize`); float arrays are taken as already normalised. Returns float32[B, S, S, 3].
  `size` (the variant's image_size) is checked, since the views are cut from exactly that square.
  """
  if size is not None and tuple(images.shape[1:]) != (size, size, 3):
    raise SphinxError(f"images: shape {tuple(images.shape)} but config.model.image_size is {size}; feed "
                      f"[B, {size}, {size}, 3] NHWC squares (data/image.py padded_resize).")
  if jnp.issubdtype(images.dtype, jnp.integer):
    return image_data.normalize(images)
  return images.astype(jnp.float32)


def quadrants(x):
  """[B, 2s, 2s, 3] -> [B, 4, s, s, 3] in the original's order TL, TR, BL, BR."""
  s = x.shape[1] // 2
  return jnp.stack([x[:, :s, :s], x[:, :s, s:], x[:, s:, :s], x[:, s:, s:]], axis=1)


def _bicubic_half(x, side):
  """`F.interpolate(x.half(), (side, side), mode="bicubic").to(x)`, the original's in-model down-sizing."""
  return resize.bicubic(x, (side, side), half=True)


def tower_views(images, model):
  """The views the towers see (SPHINX.md §4; `encode_image` of each variant file).

  Returns (small float[B, V, 224, 224, 3] for Q-Former / CLIP / DINOv2, large float[B, V, S', S', 3] for
  ConvNeXt, which applies its own legacy-nearest resize to `convnext.input_size`, fp16-rounded for
  `convnext_half_input(model)`). bicubic16 = fp16 torch bicubic, `F.interpolate(x.half(), ..., "bicubic")`.
    224, 1 view (SPHINX):            small = image;  large = small (ConvNeXt: nearest 224 -> 256)
    448, 5 views (SPHINX-1k):        small = [bicubic16(448 -> 224), TL, TR, BL, BR quadrants of the image];
                                     large = small
    512, 1 view (Tiny, MoE):         small = bicubic16(512 -> 224);  large = image (ConvNeXt: nearest 512 -> 512,
                                     i.e. the fp16 rounding)
    1024, 5 views (Tiny-1k, MoE-1k): small = [bicubic16(1024 -> 224), quadrants of bicubic16(1024 -> 448)];
                                     large = [bicubic16(1024 -> 512), quadrants of the image], not rounded again
  """
  side = images.shape[1]
  if model.views == 1:
    small = (images if side == VIEW else _bicubic_half(images, VIEW))[:, None]
  else:
    half_image = images if side == 2 * VIEW else _bicubic_half(images, 2 * VIEW)
    small = jnp.concatenate([_bicubic_half(images, VIEW)[:, None], quadrants(half_image)], axis=1)
  if model.convnext.input_size == 256:
    return small, small
  if model.views == 1:
    return small, images[:, None]
  return small, jnp.concatenate([_bicubic_half(images, side // 2)[:, None], quadrants(images)], axis=1)


def convnext_half_input(model) -> bool:
  """The 5-view 512-px variants hand ConvNeXt their views unrounded; every other variant calls `.half()`."""
  return not (model.views == 5 and model.convnext.input_size == 512)


def layout(bos, image, text, has_image, shift):
  """The decoder input of every row in one static shape, with its RoPE positions and segment ids.

  Args: bos float[B, 1, D], image float[B, M, D] (all views, tags included), text float[B, T, D],
    has_image bool[B], shift int[B] extra left padding (generation right-aligns prompts of different length).
  Returns: x float[B, 1+M+T, D], positions int32[B, 1+M+T], segments int32[B, 1+M+T] (0 = padding).
  Example (M = 2, T = 2, shift 0):
    image row   [BOS, i1, i2, t1, t2]   positions [0, 1, 2, 3, 4]   segments [1, 1, 1, 1, 1]
    text row    [ -,  -, BOS, t1, t2]   positions [0, 0, 0, 1, 2]   segments [0, 0, 1, 1, 1]
  With shift k a row is rolled right by k: its last k slots (right padding of a short prompt) wrap to the front
  and become padding.
  """
  length = 1 + image.shape[1] + text.shape[1]
  with_image = jnp.concatenate([bos, image, text], axis=1)
  without = jnp.concatenate([jnp.zeros_like(image), bos, text], axis=1)
  x = jnp.where(has_image[:, None, None], with_image, without)
  slots = jnp.arange(length, dtype=jnp.int32)[None, :]
  source = (slots - shift[:, None]) % length
  x = jnp.take_along_axis(x, source[:, :, None], axis=1)
  start = (shift + jnp.where(has_image, 0, image.shape[1])).astype(jnp.int32)[:, None]
  return x, jnp.maximum(slots - start, 0), (slots >= start).astype(jnp.int32)


def text_logits(logits, num_image_tokens: int):
  """Drops image positions so logits line up 1:1 with `tokens` ([BOS, t_1..t_T]).

  Input is [BOS, img_1..img_M, t_1..t_T]. M = 0: logits[:, 0] (on BOS) predicts t_1.
  M > 0: logits[:, M] (on end_img, or on BOS of a text-only row) predicts t_1; slots 0..M-1 are dropped.
  Args: logits float[B, 1+M+T, K]. Returns: float[B, 1+T, K].
  """
  return logits[:, num_image_tokens:]


# ------------------------------------------------------------------------------------------------ modules
class Towers(nn.Module):
  """The frozen encoders in use (`config.towers`), each in the compute dtype (params stored in it too).

  In: small float[N, 224, 224, 3], large float[N, S', S', 3] (`tower_views`, N = B * V).
  Out: (ensemble float[N, 257, C] = [CLIP | ConvNeXt | DINOv2] channels, the original's order;
        queries float[N, Q, 768] from the Q-Former, or None without one).
  """
  config: ml_collections.ConfigDict
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    c, types = self.config, dict(dtype=self.dtype, param_dtype=self.dtype)
    if "clip" in c.towers:
      self.clip = ClipVit(c.clip, **types)
    if "convnext" in c.towers:
      self.convnext = ConvNeXt(c.convnext, half_input=convnext_half_input(c), token_grid=patch_grid(c), **types)
    if "dinov2" in c.towers:
      self.dinov2 = DinoV2(c.dinov2, **types)
    if "qformer" in c.towers:
      self.qformer = Blip2(c.qformer, **types)

  def __call__(self, small, large):
    towers = self.config.towers
    streams = []
    if "clip" in towers:
      streams.append(self.clip(small)[0])
    if "convnext" in towers:
      streams.append(self.convnext(large)[0])
    if "dinov2" in towers:
      streams.append(self.dinov2(small)[0])
    queries = self.qformer(small)[0] if "qformer" in towers else None
    return (jnp.concatenate(streams, axis=-1) if streams else None), queries


class Projection(nn.Module):
  """Mirrors `nn.Sequential(nn.Linear(C, D), nn.LayerNorm(D))` (`visual_proj`, `qformer_proj`).

  float[N, L, C] -> float[N, L, D]. Params: dense/{kernel [C, D], bias [D]}, norm/{scale, bias} [D].
  """
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.dense(self.features, (None, sh.EMBED), "dense", use_bias=True, dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    return layers.layer_norm(PROJ_EPS, "norm", sh.EMBED, dtype=self.dtype, param_dtype=self.param_dtype)(x)


def _uniform(key, shape, dtype=jnp.float32):  # torch.rand, the original's init of the image tags
  return jax.random.uniform(key, shape, dtype)


class Fusion(nn.Module):
  """Projections and image tags of one view: [start_img, qformer_proj(Q), visual_proj(257), end_img].

  In: ensemble float[N, 257, C], qformer float[N, Q, 768] or None (Tiny). Out: float[N, 2 (+Q) + 257, D].
  Params: visual_proj/…, qformer_proj/… (Q-Former variants), start_img, end_img [1, 1, D] (convert/accessory.py).
  """
  dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ensemble, qformer=None):
    tokens = Projection(self.dim, self.dtype, self.param_dtype, name="visual_proj")(ensemble)
    if qformer is not None:
      queries = Projection(self.dim, self.dtype, self.param_dtype, name="qformer_proj")(qformer)
      tokens = jnp.concatenate([queries, tokens], axis=1)
    tag_init = layers.partitioned(_uniform, (None, None, sh.EMBED))
    start = self.param("start_img", tag_init, (1, 1, self.dim), self.param_dtype).astype(tokens.dtype)
    end = self.param("end_img", tag_init, (1, 1, self.dim), self.param_dtype).astype(tokens.dtype)
    n = tokens.shape[0]
    return jnp.concatenate([jnp.broadcast_to(start, (n, 1, self.dim)), tokens,
                            jnp.broadcast_to(end, (n, 1, self.dim))], axis=1)


class Sphinx(nn.Module):
  """towers (frozen by `stop_gradient` unless config.train_towers) -> fusion -> llm. `config` is `config.model`."""
  config: ml_collections.ConfigDict

  def setup(self):
    c = self.config
    dtype, param_dtype = layers.dtype_of(c.dtype), layers.dtype_of(c.param_dtype)
    self.towers = Towers(c, dtype)
    self.fusion = Fusion(c.llm.dim, dtype, param_dtype)
    self.llm = Llama(c.llm, dtype, param_dtype)

  @property
  def image_words(self) -> int:
    """M: image positions per row (291 x views; Tiny 259 x views)."""
    return image_tokens(self.config)

  def encode_images(self, images):
    """float[B, S, S, 3] CLIP-normalised (or uint8) -> image tokens float[B, M, D], views in order, tags in."""
    small, large = tower_views(model_images(images, self.config.image_size), self.config)
    b, v = small.shape[:2]
    ensemble, queries = self.towers(small.reshape(b * v, *small.shape[2:]), large.reshape(b * v, *large.shape[2:]))
    if not self.config.get("train_towers"):  # frozen towers: no gradient, no optimizer state
      ensemble, queries = jax.lax.stop_gradient((ensemble, queries))
    tokens = self.fusion(ensemble, queries)
    return tokens.reshape(b, v * tokens.shape[1], tokens.shape[2])

  def _inputs(self, tokens, images, has_image, shift):
    text = self.llm.embed(tokens)
    image = self.encode_images(images).astype(text.dtype)
    if has_image is None:
      has_image = jnp.ones(tokens.shape[:1], bool)
    return layout(text[:, :1], image, text[:, 1:], has_image, shift)

  def __call__(self, tokens, images=None, has_image=None, return_hidden=False):
    """Logits float[B, 1+T, K] aligned with tokens int[B, 1+T]; `images` None runs the decoder alone.
    return_hidden: the final norm's output float[B, 1+T, D] instead (the trainer applies lm_head in its loss)."""
    if images is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
      return self.llm(tokens, positions=positions, return_hidden=return_hidden)[0]
    x, positions, segments = self._inputs(tokens, images, has_image, jnp.zeros(tokens.shape[:1], jnp.int32))
    out, _ = self.llm(embeddings=x, positions=positions, segment_ids=segments, return_hidden=return_hidden)
    return text_logits(out, self.image_words)

  def prefill(self, tokens, lengths, cache, images=None, has_image=None):
    """First generation step: fills `cache` with the image block and the prompts.

    Args: tokens int[B, P] prompts with BOS, right-padded (any id) beyond lengths int[B]; cache from
      `llama.init_cache` with room for 1+M+P-1 and the new tokens; images as in `__call__` (None: text only).
    Returns: (logits float[B, K] for the token after each prompt, cache, next position int32[B]).
    Prompts are right-aligned (left padding is masked) so that every row writes its next token to the same slot.
    """
    shift = tokens.shape[1] - lengths.astype(jnp.int32)
    if images is None:
      text = self.llm.embed(tokens)
      x, positions, segments = layout(text[:, :1], text[:, :0], text[:, 1:], jnp.ones(tokens.shape[:1], bool),
                                      shift)
    else:
      x, positions, segments = self._inputs(tokens, images, has_image, shift)
    logits, cache = self.llm(embeddings=x, positions=positions, segment_ids=segments, cache=cache,
                             last_only=True)
    return logits[:, -1], cache, positions[:, -1] + 1

  def decode(self, tokens, positions, cache):
    """One step: tokens int[B, 1] at positions int[B, 1] -> (logits float[B, K], cache)."""
    logits, cache = self.llm(tokens, positions=positions, cache=cache)
    return logits[:, -1], cache
