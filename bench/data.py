"""Data pipeline throughput: samples/s per worker process, ours (Grain) vs a plain PyTorch DataLoader.

Run:  flock /tmp/sphinx_heavy.lock python bench/data.py [--samples 256] [--workers 1]

Both loaders do the same work per sample in one worker process: read the file, decode, PadToSquare + PIL
bicubic resize (the original `T_padded_resize`), and tokenise the conversation with the conv_v1_2 rule
(data/conversation.py, on the real Mistral v1 tokenizer). They differ where the designs differ: the PyTorch
loader, like the original, normalises on the host (ToTensor + Normalize -> float32 CHW); ours ships uint8 HWC
and normalises on device. Sizes: 224 (1-view variants' resolution) and 448 (SPHINX-1k: 5 views cut on
device). Images: real photos (scikit-image astronaut 512x512, chelsea 451x300, coffee 600x400 as JPEG q95)
and synthetic ones (the shapes world, PNG, 160-288 px).

Consumption by training (the arithmetic, printed at the end): per SPHINX-1k sample,
  FLOPs ~ 6 * 13.0e9 (LLaMA-2-13B) * L (1455 image + text tokens, L = 2048)
        + 5 views * (2 * tower params * tokens) for the frozen towers, forward only:
          CLIP-L 0.30e9 * 257, DINOv2-g 1.14e9 * 257, EVA-g 1.0e9 * 257 (+ Q-Former, small),
          ConvNeXt-XXL ~0.85e9 params, counted as 2 * params * 257 tokens-equivalent
  A v5p host = 4 chips * 459e12 bf16 FLOP/s; at an assumed 50% MFU, samples/s per host = 0.5 * peak / FLOPs.
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import tempfile
import time

import torch
import torchvision.transforms as T
from PIL import Image
from skimage import data as skdata

from sphinx_jax import host_memory
from sphinx_jax import config as cfg
from sphinx_jax.data import conversation, image as image_lib, pipeline, shapes
from sphinx_jax.data.tokenizer import Tokenizer

QUESTION = "Generate a detailed description about the image."
ANSWER = ("The image shows a scene with several objects arranged on a plain background; the main subject sits "
          "near the centre and the lighting comes from the left.")


def tokenizer():
  path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
  return Tokenizer.from_file(str(path))


def write_images(root, kind, count):
  os.makedirs(root, exist_ok=True)
  paths = []
  if kind == "photos":
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]
    for i, array in enumerate(photos):
      path = os.path.join(root, f"photo_{i}.jpg")
      Image.fromarray(array).save(path, quality=95)
      paths.append(path)
  else:
    world = shapes.World(seed=0)
    for i in range(count):
      path = os.path.join(root, f"shapes_{i}.png")
      world.scene(i, "shapes")[0].save(path)
      paths.append(path)
  return [paths[i % len(paths)] for i in range(count)]


def write_jsonl(path, images):
  with open(path, "w") as f:
    for image in images:
      f.write(json.dumps({"image": image, "conversations": [{"from": "human", "value": QUESTION},
                                                             {"from": "gpt", "value": ANSWER}]}) + "\n")


class TorchDataset(torch.utils.data.Dataset):
  """The original's way: PIL open, T_padded_resize to float32 CHW, plus the same tokenisation."""

  def __init__(self, images, size, tok, max_len, image_words):
    self.images, self.tok, self.max_len, self.image_words = images, tok, max_len, image_words
    self.transform = T.Compose([image_lib.pad_to_square, T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                                T.ToTensor(), T.Normalize(image_lib.CLIP_MEAN, image_lib.CLIP_STD)])

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    image = self.transform(Image.open(self.images[i]).convert("RGB"))
    sample = conversation.tokenize_dialog(self.tok, [{"from": "human", "value": QUESTION},
                                                     {"from": "gpt", "value": ANSWER}],
                                          max_len=self.max_len, image_words=self.image_words)
    return image, torch.from_numpy(sample.tokens), torch.from_numpy(sample.loss_mask)


def time_torch(images, size, tok, workers, batch, max_len, image_words):
  loader = torch.utils.data.DataLoader(TorchDataset(images, size, tok, max_len, image_words), batch_size=batch,
                                       num_workers=workers, persistent_workers=workers > 0)
  it = iter(loader)
  next(it)  # start-up and the first batch are not throughput
  start, n = time.perf_counter(), 0
  for images_batch, _, _ in it:
    n += len(images_batch)
  return n / (time.perf_counter() - start)


def time_ours(jsonl, size, tok, workers, batch, max_len, image_words, count):
  d = cfg.data_config(global_batch_size=batch, max_len=max_len, num_workers=workers, epochs=1, prefetch=2)
  d.datasets.bench = cfg.dataset_config("conversations", jsonl)
  it = pipeline.make_iterator(d, tok, image_size=size, image_words=image_words, shard_index=0, shard_count=1)
  next(it)
  start, n = time.perf_counter(), 0
  for _ in range(count // batch - 1):
    n += len(next(it)["tokens"])
  rate = n / (time.perf_counter() - start)
  it.close()
  return rate


def training_rate():
  llm = 6 * 13.0e9 * 2048
  towers = 5 * 2 * (0.30e9 + 1.14e9 + 1.0e9 + 0.85e9) * 257
  flops = llm + towers
  host_peak = 4 * 459e12
  return flops, 0.5 * host_peak / flops


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", type=int, default=256)
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args()
  tok = tokenizer()
  max_len = 2048
  print(f"{'images':8s} {'size':>5s} {'ours/s':>8s} {'torch/s':>8s} {'ratio':>6s}   (per {args.workers} worker "
        f"process(es), {args.samples} samples)")
  with tempfile.TemporaryDirectory() as tmp:
    for kind in ("photos", "synthetic"):
      images = write_images(os.path.join(tmp, kind), kind, args.samples)
      jsonl = os.path.join(tmp, f"{kind}.jsonl")
      write_jsonl(jsonl, images)
      for size, image_words in ((224, 291), (448, 1455)):
        ours = time_ours(jsonl, size, tok, args.workers, args.batch, max_len, image_words, args.samples)
        theirs = time_torch(images, size, tok, args.workers, args.batch, max_len, image_words)
        print(f"{kind:8s} {size:5d} {ours / args.workers:8.1f} {theirs / args.workers:8.1f} {ours / theirs:6.2f}")
  flops, rate = training_rate()
  print(f"training consumption, SPHINX-1k on one v5p host (4 chips, 50% MFU): {flops:.3g} FLOP/sample -> "
        f"{rate:.1f} samples/s per host")


if __name__ == "__main__":
  host_memory.restart_with_allocator()  # the allocator the sphinx-jax program runs with
  main()
