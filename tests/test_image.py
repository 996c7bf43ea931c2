"""The host image path equals the original `T_padded_resize` done with torchvision on real photos."""
import io

import jax
import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image
from skimage import data as skdata

from sphinx_jax.data import image as image_lib
from sphinx_jax.errors import SphinxError


class ReferencePadToSquare:
  """PadToSquare written from SPHINX.md §3.1: background int(255 * CLIP mean), centred paste."""

  def __call__(self, img):
    width, height = img.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in (0.48145466, 0.4578275, 0.40821073)))
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def reference_transform(size):
  return T.Compose([
      ReferencePadToSquare(),
      T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
      T.ToTensor(),
      T.Normalize(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711]),
  ])


def photos():
  astronaut = Image.fromarray(skdata.astronaut())       # 512 x 512, square
  chelsea = Image.fromarray(skdata.chelsea())           # 451 x 300, wide
  coffee = Image.fromarray(skdata.coffee())             # 600 x 400, wide
  return {
      "astronaut": astronaut, "chelsea": chelsea, "coffee": coffee,
      "tall_crop": coffee.crop((100, 0, 317, 400)),     # 217 x 400: odd width, padding on the left/right
      "wide_crop": astronaut.crop((0, 40, 512, 301)),   # 512 x 261: odd height, padding above/below
      "tall_gray": Image.fromarray(skdata.camera()).crop((0, 0, 123, 512)),  # mode L -> RGB convert
  }


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("name", list(photos()))
def test_padded_resize_matches_torchvision(name, size):
  img = photos()[name]
  expected = reference_transform(size)(img.convert("RGB")).permute(1, 2, 0).numpy()   # CHW -> HWC
  ours_np = image_lib.padded_resize_normalized(img, size)
  np.testing.assert_allclose(ours_np, expected, rtol=0, atol=1e-6)
  pixels = image_lib.padded_resize(img, size)
  assert pixels.dtype == np.uint8 and pixels.shape == (size, size, 3)
  ours_device = np.asarray(jax.jit(image_lib.normalize)(pixels))
  np.testing.assert_allclose(ours_device, expected, rtol=0, atol=1e-6)


def test_padding_geometry_and_colour():
  """A 6x2 white image padded to 6x6: rows 0-1 and 4-5 are the CLIP-mean colour, rows 2-3 white."""
  img = Image.new("RGB", (6, 2), (255, 255, 255))
  out = image_lib.padded_resize(img, 6)
  np.testing.assert_array_equal(out[:2], np.broadcast_to((122, 116, 104), (2, 6, 3)))
  np.testing.assert_array_equal(out[2:4], 255)
  np.testing.assert_array_equal(out[4:], np.broadcast_to((122, 116, 104), (2, 6, 3)))


def test_bytes_and_path_decode_identically(tmp_path):
  img = photos()["chelsea"]
  buffer = io.BytesIO()
  img.save(buffer, format="PNG")
  path = tmp_path / "chelsea.png"
  path.write_bytes(buffer.getvalue())
  from_path = image_lib.load_padded(str(path), 224)
  np.testing.assert_array_equal(from_path, image_lib.load_padded(buffer.getvalue(), 224))
  np.testing.assert_array_equal(from_path, image_lib.padded_resize(img, 224))


def test_decode_errors_name_the_file(tmp_path):
  missing = tmp_path / "missing.jpg"
  with pytest.raises(SphinxError, match="missing.jpg.*not found"):
    image_lib.load_rgb(str(missing))
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"not an image at all")
  with pytest.raises(SphinxError, match="garbage.jpg.*cannot decode"):
    image_lib.load_rgb(str(garbage))
  buffer = io.BytesIO()
  photos()["coffee"].save(buffer, format="JPEG")
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
  with pytest.raises(SphinxError, match="truncated.jpg.*cannot decode"):
    image_lib.load_rgb(str(truncated))
  with pytest.raises(SphinxError, match="record-7.*cannot decode"):
    image_lib.load_rgb(b"\x89PNG broken", name="record-7")
