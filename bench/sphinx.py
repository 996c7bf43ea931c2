"""Whole SPHINX: time to first token and decode tokens/s of our `Generator` vs the composed PyTorch reference
with a KV cache on the same weights; and `sphinx-jax convert --from accessory` throughput and peak memory on a
synthetic full-size-shaped SPHINX-Tiny checkpoint.

Run:  flock /tmp/sphinx_heavy.lock python bench/sphinx.py [--parts decode,convert] [--models tiny,mid]
          [--batches 1,8] [--iters 3] [--convert-mp 2] [--convert-args ';--no-scan'] [--workdir DIR]

Decode part. Models (SPHINX-1k layout: 5 views of a 448 image, 5 x 291 image positions, all four towers):
  tiny  configs/sphinx.py `tiny_sphinx_1k` (decoder dim 64, 2 layers, vocab 768)
  mid   decoder dim 512, 8 layers, 8 heads, vocab 32000; towers at a quarter of the released widths (MID_TOWERS)
The torch side is `tests/torch_sphinx.py`'s `TorchSphinx` (real open_clip / timm / dinov2 / transformers towers,
every weight random) and its KV-cached `greedy`; its state dict goes through an accessory directory and
`import_accessory` into the JAX model, as a user's checkpoint would. Prompts: PROMPT random ids after BOS, all
rows the same length, greedy, NEW new tokens (no stop rules). JAX: `Generator(..., unscan_layers=True)`.
  time to first token (TTFT): a whole call asking for 1 new token (towers on 5 views, prefill, first argmax);
  decode tokens/s: batch * (NEW - 1) / (t(NEW tokens) - t(1 token)), fastest rounds; on the torch side both
  calls start from the image block computed beforehand, so the towers' (large, noisy) time does not enter the
  difference; on the JAX side the towers run in both calls (the Generator takes images).
Timing (bench/timing.py): one warm-up call each (mostly compilation; printed), then the five calls of a batch
size run interleaved for --iters rounds; the fastest of each counts.
Target (issue 4): JAX decode >= 2x the reference's tokens/s at batch 1.

Convert part. A SPHINX-Tiny checkpoint at released shapes (TinyLlama 1.1B decoder + ConvNeXt-XXL + DINOv2 ViT-g,
about 6.2 GB of bf16 random values) written as `--convert-mp` shards, then `sphinx-jax convert --from accessory
--to orbax` in a child process whose memory is sampled every 50 ms from /proc (VmRSS; RssAnon = the process's
own allocations, RssFile = resident pages of the memory-mapped shards). GB/s = bytes of the shards / wall time.
Target: peak RSS <= 1.5x the largest shard. The files are deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from configs import sphinx as presets  # noqa: E402
from sphinx_jax import host_memory  # noqa: E402
from sphinx_jax.convert import accessory  # noqa: E402
from sphinx_jax.inference.generate import Generator  # noqa: E402
from sphinx_jax.models.sphinx import Sphinx  # noqa: E402
# the parity tests' torch SPHINX and key tables, so the benchmark times exactly what the tests check
from test_accessory_keys import our_shapes  # noqa: E402
from timing import fastest, warm_up  # noqa: E402  (bench/ is the script's directory)
from torch_sphinx import TorchSphinx, accessory_dir, photo, randomise, torch_image  # noqa: E402

TOKENIZER = ROOT / "configs" / "assets" / "demo_tokenizer.model"  # 768 pieces; prompts are ids
PROMPT, NEW = 32, 64
MID_LLM = dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, multiple_of=256, vocab_size=32000)
MID_TOWERS = dict(
    clip=dict(width=256, layers=6, heads=4, mlp_dim=1024, embed_dim=192, text=dict(vocab=4096, context=77, width=192)),
    convnext=dict(depths=(1, 1, 6, 1), dims=(96, 192, 384, 768)),
    dinov2=dict(width=384, depth=10, heads=6, mlp_hidden=1024),
    qformer=dict(vision=dict(width=352, layers=10, heads=4, mlp_dim=1536),
                 qformer=dict(hidden=192, layers=4, heads=4, intermediate=768)),
)


# ------------------------------------------------------------------------------------------ decode part
def bench_config(name: str):
  """Full config of a benchmarked model (fp32 on both sides)."""
  if name == "tiny":
    config = presets.variant_config("tiny_sphinx_1k")
    config.model.llm.vocab_size = 768
    return config
  config = presets.variant_config("tiny_sphinx_1k")  # tiny twin's head counts etc., then widened
  config.model.llm.update(MID_LLM)
  for tower, fields in MID_TOWERS.items():
    config.model[tower].update(fields)
  return config


def build_pair(name: str, workdir: Path):
  """(torch reference, JAX Generator) on the same random weights, moved through an accessory directory."""
  config = bench_config(name)
  torch.manual_seed(0)
  reference = TorchSphinx(config.model).eval()
  randomise(reference, seed=1)
  directory = workdir / f"decode_{name}"
  directory.mkdir(parents=True, exist_ok=True)
  accessory_dir(reference, config.model, directory, TOKENIZER)
  params, imported, _ = accessory.import_accessory(directory, progress=False,
                                                   config=None if name == "tiny" else config)
  shutil.rmtree(directory)
  params = jax.device_put(jax.tree.map(np.asarray, {k: params[k] for k in ("llm", "towers", "fusion")}))
  return reference, Generator(Sphinx(imported.model), params, unscan_layers=True, buckets=(PROMPT, NEW))


def decode_runs(reference, generator, batch: int, outputs: dict):
  """name -> a call; the NEW-token calls leave their ids in outputs["jax"] / outputs["torch"]."""
  rng = np.random.default_rng(batch)
  vocab = generator.model.config.llm.vocab_size
  prompts = np.concatenate([np.ones((batch, 1), np.int64), rng.integers(3, vocab, (batch, PROMPT - 1))], axis=1)
  images = np.concatenate([photo(generator.model.config.image_size)] * batch)
  torch_prompts, torch_images = torch.from_numpy(prompts), torch_image(images)
  with torch.inference_mode():
    image_block = reference.encode_image(torch_images)

  def jax_run(new, name):
    def run():
      outputs[name] = np.array(generator.generate_ids(prompts.tolist(), images, max_new_tokens=new))
    return run

  def torch_run(new, name, block=None):
    def run():
      with torch.inference_mode():
        image = reference.encode_image(torch_images) if block is None else block
        outputs[name] = reference.greedy(torch_prompts, image, new).numpy()
    return run

  return {"jax ttft": jax_run(1, "jax ttft"), f"jax {NEW}": jax_run(NEW, "jax"),
          "torch ttft": torch_run(1, "torch ttft"), "torch 1 (image block given)": torch_run(1, "t1", image_block),
          f"torch {NEW} (image block given)": torch_run(NEW, "torch", image_block)}


def decode_seconds(best, i: int) -> dict:
  """Seconds of NEW - 1 decode steps per side from the fastest calls; i 0 wall, 1 CPU time."""
  return {"jax": best[f"jax {NEW}"][i] - best["jax ttft"][i],
          "torch": best[f"torch {NEW} (image block given)"][i] - best["torch 1 (image block given)"][i]}


def decode_part(args, workdir: Path) -> None:
  print(f"decode: SPHINX-1k layout (5 views), prompt {PROMPT} ids, {NEW} new tokens, greedy, float32", flush=True)
  for name in args.models.split(","):
    reference, generator = build_pair(name, workdir)
    llm = generator.model.config.llm
    print(f"  model {name}: decoder dim {llm.dim} x {llm.n_layers} layers, vocab {llm.vocab_size}; "
          f"{generator.model.image_words} image positions", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
      outputs = {}
      runs = decode_runs(reference, generator, batch, outputs)
      first = warm_up(runs)
      best = fastest(runs, args.iters, warm=False)
      rate, cpu = ({side: batch * (NEW - 1) / max(seconds, 1e-9) for side, seconds in decode_seconds(best, i).items()}
                   for i in (0, 1))
      same = float(np.mean(outputs["jax"] == outputs["torch"]))
      print(f"    batch {batch}: TTFT jax {best['jax ttft'][0]:7.3f} s  torch {best['torch ttft'][0]:7.3f} s "
            f"(x{best['torch ttft'][0] / best['jax ttft'][0]:.2f});  decode jax {rate['jax']:8.1f} tok/s  "
            f"torch {rate['torch']:8.1f} tok/s (x{rate['jax'] / rate['torch']:.2f}; by CPU time "
            f"x{cpu['jax'] / cpu['torch']:.2f});  {same:.0%} of tokens equal;  "
            f"first calls (s): " + ", ".join(f"{k} {v:.1f}" for k, v in first.items()), flush=True)


# ----------------------------------------------------------------------------------------- convert part
def merged_shapes(variant: str) -> dict:
  """{merged key: shape} of a preset, from the export key map over shape-only stand-ins (nothing allocated)."""
  model = presets.variant_config(variant).model
  stand_in = lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape)
  state = accessory.accessory_state(jax.tree.map(stand_in, our_shapes(model)), model)
  return {key: tuple(value.shape) for key, value in state.items()}


def write_synthetic(directory: Path, variant: str, mp: int) -> list[int]:
  """bf16 random shards + config/meta/tokenizer; returns shard sizes (bytes). Each merged tensor is drawn from
  its own seed and split by the fairscale rules (replicas equal), one rank's file in memory at a time."""
  model = presets.variant_config(variant).model
  shapes = merged_shapes(variant)
  total = sum(2 * int(np.prod(s)) for s in shapes.values())
  print(f"convert: synthetic {variant}, {len(shapes)} tensors, {total / 1e9:.2f} GB bf16, mp {mp}", flush=True)
  sizes = []
  for rank in range(mp):
    state = {}
    for seed, (key, shape) in enumerate(shapes.items()):
      full = np.random.default_rng(seed).standard_normal(shape, np.float32)
      state[accessory.PREFIX + key] = torch.from_numpy(accessory.split_tensor(key, full, mp, None)[rank].copy()
                                                       ).to(torch.bfloat16)
    path = directory / accessory.shard_name(rank, mp)
    torch.save(state, path)
    del state
    sizes.append(path.stat().st_size)
  (directory / "config.json").write_text(json.dumps(accessory.model_args(model)))
  (directory / "meta.json").write_text(json.dumps({"llama_type": model.llama_type}))
  shutil.copyfile(TOKENIZER, directory / "tokenizer.model")
  return sizes


def peak_memory(pid: int, stop: threading.Event, peaks: dict) -> None:
  """Samples VmRSS / RssAnon / RssFile (kB) of `pid` until `stop`; keeps the maxima in `peaks`."""
  while not stop.is_set():
    try:
      fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except (FileNotFoundError, ProcessLookupError):
      return
    for name in ("VmRSS", "RssAnon", "RssFile"):
      if name in fields:
        peaks[name] = max(peaks.get(name, 0), int(fields[name].split()[0]) * 1024)
    time.sleep(0.05)


def convert_once(src: Path, dst: Path, extra: list[str]) -> tuple[float, dict]:
  """Runs `sphinx-jax convert --from accessory --to orbax SRC DST *extra` in a child; (seconds, peak memory)."""
  command = [sys.executable, "-m", "sphinx_jax", "convert", "--from", "accessory", "--to", "orbax", str(src),
             str(dst), *extra]
  peaks, stop = {}, threading.Event()
  start = time.perf_counter()
  child = subprocess.Popen(command, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  sampler = threading.Thread(target=peak_memory, args=(child.pid, stop, peaks))
  sampler.start()
  code = child.wait()
  seconds = time.perf_counter() - start
  stop.set()
  sampler.join()
  shutil.rmtree(dst, ignore_errors=True)
  if code:
    raise SystemExit(f"{' '.join(command)} exited with {code}")
  return seconds, peaks


def convert_part(args, workdir: Path) -> None:
  src = workdir / "tiny_accessory"
  src.mkdir(parents=True, exist_ok=True)
  try:
    sizes = write_synthetic(src, args.convert_variant, args.convert_mp)
    shards, largest = sum(sizes), max(sizes)
    print(f"  {len(sizes)} shard(s), largest {largest / 1e9:.2f} GB, total {shards / 1e9:.2f} GB", flush=True)
    for extra in args.convert_args.split(";"):
      seconds, peaks = convert_once(src, workdir / "tiny_orbax", extra.split())
      print(f"    convert {extra or '(defaults)'}: {seconds:.1f} s, {shards / seconds / 1e9:.3f} GB/s;  peak VmRSS "
            f"{peaks['VmRSS'] / 1e9:.2f} GB (RssAnon {peaks['RssAnon'] / 1e9:.2f} GB, RssFile "
            f"{peaks['RssFile'] / 1e9:.2f} GB) = x{peaks['VmRSS'] / largest:.2f} the largest shard (target <= 1.5)",
            flush=True)
  finally:
    shutil.rmtree(src, ignore_errors=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="decode,convert")
  parser.add_argument("--models", default="tiny,mid")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--convert-mp", type=int, default=2)
  parser.add_argument("--convert-variant", default="sphinx_tiny", help="preset whose shapes the shards get")
  parser.add_argument("--convert-args", default=";--no-scan",
                      help="';'-separated extra argument sets of `convert`, each timed on the same shards")
  parser.add_argument("--workdir", help="scratch directory (default: a temp dir, removed at the end)")
  args = parser.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.set_grad_enabled(False)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} threads "
        f"{torch.get_num_threads()}; load {Path('/proc/loadavg').read_text().split()[:3]}", flush=True)
  workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_sphinx_"))
  try:
    if "decode" in args.parts:
      decode_part(args, workdir)
    if "convert" in args.parts:
      convert_part(args, workdir)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  host_memory.restart_with_allocator()  # the allocator the sphinx-jax program runs with
  main()
