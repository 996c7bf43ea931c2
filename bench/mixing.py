"""Weight mixing at scale: peak memory and throughput of `sphinx_jax.mixing.mix` on two synthetic checkpoints of
--gb GB each, against a plain `cp -r` of one input's bytes timed in the same run.

Run:  flock /tmp/sphinx_heavy.lock python bench/mixing.py [--gb 4.2] [--dir /work/bench_mix] [--chunk-mb 64]
The checkpoints are model directories written by the project's streamed writer (so generating them needs no
more memory than the mix): a scanned-layer-like fp32 stack that dominates the size, bf16 embedding and MLP
leaves, and an fp32 tower leaf outside the default `llm/.*` pattern (copied, not mixed). Everything under
--dir is deleted at the end unless --keep.

Peak RSS: resident memory sampled every 2 ms by a thread during the mix, minus the resident memory just before
it (after a warm-up mix of two tiny checkpoints, so one-time library set-up counts in the baseline).
Throughput: output bytes / mix wall time (the mix reads two inputs and writes one); copy: input bytes /
`cp -r` wall time. Both read inputs written moments before, so both read from the page cache alike.
CPU seconds (user + system, all threads; `cp` as a child) are printed too: on a shared, oversubscribed machine
wall time says more about the neighbours than about the code.
Targets (issue 7): peak RSS <= 1 GB above the baseline, throughput within 2x of the copy.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_collections
import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sphinx_jax import checkpoint, mixing  # noqa: E402

GB = 1 << 30


def leaf_shapes(total_gb: float) -> dict:
  """{path: (shape, dtype)}: fixed small leaves plus an fp32 [n, 4096, 8192] stack filling the rest."""
  small = {"llm/embed": ((32000, 4096), ml_dtypes.bfloat16), "llm/layers/mlp": ((24, 4096, 2048), ml_dtypes.bfloat16),
           "towers/clip/kernel": ((4096, 4096), np.float32)}
  used = sum(np.prod(s) * np.dtype(d).itemsize for s, d in small.values())
  layers = max(1, round((total_gb * GB - used) / (4096 * 8192 * 4)))
  return {"llm/layers/kernel": ((layers, 4096, 8192), np.float32), **small}


def random_leaf(shape, dtype, seed) -> checkpoint.StreamedLeaf:
  def fill(region):
    rng = np.random.default_rng([seed, *(r.start for r in region)])
    return rng.standard_normal(tuple(r.stop - r.start for r in region), np.float32).astype(dtype)
  return checkpoint.StreamedLeaf(tuple(shape), np.dtype(dtype), fill)


def make_input(path, shapes, seed, config, chunk):
  leaves = {p: random_leaf(s, d, seed * 1000 + i) for i, (p, (s, d)) in enumerate(shapes.items())}
  checkpoint.save_streamed_model_dir(path, leaves, config, chunk_bytes=chunk)


def rss() -> int:
  return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_during(fn):
  """(seconds, peak resident bytes above the start) of fn()."""
  peak, done, start = [0], threading.Event(), rss()

  def watch():
    while not done.is_set():
      peak[0] = max(peak[0], rss())
      time.sleep(0.002)

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  t0 = time.perf_counter()
  try:
    fn()
  finally:
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
  return seconds, max(peak[0], rss()) - start


def cpu_seconds(who) -> float:
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


def du(path) -> int:
  return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gb", type=float, default=4.2, help="parameter bytes per input checkpoint")
  parser.add_argument("--dir", default="/work/bench_mix", help="scratch directory (deleted at the end)")
  parser.add_argument("--chunk-mb", type=int, default=checkpoint.CHUNK_BYTES >> 20)
  parser.add_argument("--keep", action="store_true")
  args = parser.parse_args()
  root, chunk = Path(args.dir), args.chunk_mb << 20
  if root.exists():
    sys.exit(f"{root} exists; remove it or pass another --dir")
  free = shutil.disk_usage(root.parent).free
  if free < 4.5 * args.gb * GB:
    sys.exit(f"{root.parent}: {free / GB:.1f} GB free, need {4.5 * args.gb:.1f} GB (3 checkpoints and a copy)")
  config = ml_collections.ConfigDict({"model": {"name": "bench"}})
  shapes = leaf_shapes(args.gb)
  root.mkdir(parents=True)
  try:
    t0 = time.perf_counter()
    for i in range(2):
      make_input(root / f"in{i}", shapes, i, config, chunk)
    made = time.perf_counter() - t0
    tiny = {"llm/w": ((4, 4), np.float32)}
    for i in range(2):
      make_input(root / f"warm{i}", tiny, i, config, chunk)
    mixing.mix(root / "warm_out", mixing.Recipe((str(root / "warm0"), str(root / "warm1")), (0.5, 0.5)))
    baseline = rss()

    recipe = mixing.Recipe((str(root / "in0"), str(root / "in1")), (0.5, 0.5))
    cpu0 = cpu_seconds(resource.RUSAGE_SELF)
    mix_s, mix_rss = peak_rss_during(lambda: mixing.mix(root / "out", recipe, chunk_bytes=chunk))
    mix_cpu = cpu_seconds(resource.RUSAGE_SELF) - cpu0
    t0, cpu0 = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
    subprocess.run(["cp", "-r", str(root / "in0"), str(root / "copy")], check=True)
    copy_s, copy_cpu = time.perf_counter() - t0, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0

    params = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in shapes.values())
    on_disk = du(root / "in0" / checkpoint.PARAMS_DIR)
    print(f"inputs: 2 x {params / GB:.2f} GB of parameters ({on_disk / GB:.2f} GB on disk), leaves "
          f"{ {p: (list(s), np.dtype(d).name) for p, (s, d) in shapes.items()} }, chunk {args.chunk_mb} MB, "
          f"generated in {made:.0f} s")
    print(f"interpreter baseline RSS {baseline / GB:.2f} GB")
    print(f"mix:  {mix_s:7.1f} s  {params / GB / mix_s:6.3f} GB/s (output params)  CPU {mix_cpu:6.1f} s  "
          f"peak RSS +{mix_rss / GB:.3f} GB")
    print(f"cp:   {copy_s:7.1f} s  {on_disk / GB / copy_s:6.3f} GB/s (bytes copied)    CPU {copy_cpu:6.1f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"ratio mix/cp time: {mix_s / copy_s:.2f}x  (target <= 2x);  peak RSS target <= 1 GB: "
          f"{'met' if mix_rss <= GB else 'missed'}")
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
