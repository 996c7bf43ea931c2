"""Host image path; mirrors LLaMA2-Accessory `accessory/data/transform.py::T_padded_resize` (SPHINX.md §3.1).

The original: RGB convert (`data_reader.read_img_general`), `PadToSquare` (paste centred on a square canvas
of side max(W, H) at ((side - W) // 2, (side - H) // 2), filled with int(255 * CLIP mean) = (122, 116, 104)),
torchvision `Resize(size, BICUBIC)` on the PIL image (torchvision 0.29 calls `PIL.Image.resize((size, size),
BICUBIC)`, PIL's antialiased bicubic), `ToTensor` (/255) and `Normalize` with the OpenAI-CLIP statistics.

Split for throughput: workers produce `uint8[S, S, 3]` (HWC) with `padded_resize`, a quarter of the bytes of
float32; the device normalises with `normalize` (jnp, jit-able). `padded_resize_normalized` is the float
numpy reference of the whole transform, for tests.

S = the variant's `model.image_size`: 224 (SPHINX), 448 (SPHINX-1k), 512 (Tiny, MoE), 1024 (Tiny-1k,
MoE-1k). The host always delivers this one padded square; the 5-view split of the 1k variants (global view +
four quadrants, SPHINX.md §4) happens inside the model, as in the original, which does it on device in fp16.
"""
from __future__ import annotations

import io

import jax.numpy as jnp
import numpy as np
from PIL import Image

from sphinx_jax.errors import SphinxError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(255 * m) for m in CLIP_MEAN)  # (122, 116, 104), the original's truncation

Image.MAX_IMAGE_PIXELS = None  # the original reader lifts PIL's decompression-bomb limit too


def load_rgb(source: str | bytes, name: str | None = None) -> Image.Image:
  """Decodes a path or encoded bytes to an RGB PIL image; any failure is a SphinxError naming the file.

  `name` (a record id or file name) replaces the description of `source` in the message for bytes.
  """
  where = name or (source if isinstance(source, str) else f"<{len(source)} encoded bytes>")
  try:
    with Image.open(source if isinstance(source, str) else io.BytesIO(source)) as image:
      return image.convert("RGB")  # convert() forces the full decode, so truncated files fail here
  except FileNotFoundError:
    raise SphinxError(f"image {where}: file not found; fix the path or the dataset's image root.") from None
  except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
    raise SphinxError(f"image {where}: cannot decode ({error}); replace or drop the file.") from None


def pad_to_square(image: Image.Image) -> Image.Image:
  """The original `PadToSquare`: centred on a (122, 116, 104) square of side max(W, H); squares pass through."""
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  canvas = Image.new(image.mode, (side, side), PAD_COLOR)
  canvas.paste(image, ((side - width) // 2, (side - height) // 2))
  return canvas


def padded_resize(image: Image.Image, size: int) -> np.ndarray:
  """PadToSquare + PIL bicubic resize. Returns uint8[size, size, 3] (HWC), what workers ship."""
  square = pad_to_square(image.convert("RGB"))
  if square.size != (size, size):
    square = square.resize((size, size), Image.BICUBIC)
  return np.asarray(square, dtype=np.uint8)


def load_padded(source: str | bytes, size: int, name: str | None = None) -> np.ndarray:
  """Decode + padded resize: path or bytes -> uint8[size, size, 3]."""
  return padded_resize(load_rgb(source, name), size)


def normalize(pixels):
  """uint8[..., 3] -> float32[..., 3]: ToTensor's /255 then CLIP Normalize, in the original's op order.

  Pure jnp; run it on device inside the jitted step.
  """
  x = jnp.asarray(pixels).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def padded_resize_normalized(image: Image.Image, size: int) -> np.ndarray:
  """Float reference of the whole `T_padded_resize` in numpy float32: float32[size, size, 3] (HWC)."""
  x = padded_resize(image, size).astype(np.float32) / np.float32(255.0)
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)

