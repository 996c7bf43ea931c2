"""Weight mixing at scale: peak memory and throughput of `sphinx_jax.mixing.mix` on two synthetic checkpoints of
--gb GB each, against `cp -r` of the same input bytes, interleaved round by round in one run.

Run:  flock /tmp/sphinx_heavy.lock python bench/mixing.py [--gb 4.2] [--dir /work/bench_mix] [--rounds 2]
The checkpoints are model directories written by the project's streamed writer (so generating them needs no
more memory than the mix; uncompressed like every model directory sphinx_jax writes, or zstd-compressed with
--compressed-inputs, like directories written before that default): a scanned-layer-like fp32 stack that
dominates the size, bf16 embedding and MLP leaves, and an fp32 tower leaf outside the default `llm/.*`
pattern (copied, not mixed). Everything under --dir is deleted at the end unless --keep.

What "the same bytes" means: the mix reads both inputs and writes one output; the copy baseline is
`cp -r in0 in1 DST`, which reads the same input bytes (and writes twice what the mix writes). Each round runs
the copy, then `sync` of the copied files (the mix fsyncs its output before renaming it into place; cp does
not), then the mix; the copy and the output are deleted before the next round. Ratios are per round, and for
the best round of each.
Peak RSS: resident memory sampled every 2 ms by a thread during the mix, minus the resident memory just before
it (after a warm-up mix of two tiny checkpoints, so one-time library set-up counts in the baseline).
Throughput: output parameter bytes / mix wall time. CPU seconds (user + system, all threads; `cp` as a child)
are printed too: on a shared, oversubscribed machine wall time says more about the neighbours than the code.
Targets (issue 7): peak RSS <= 1 GB above the baseline, mix time within 2x of the copy.
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

from sphinx_jax import host_memory  # noqa: E402
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


def make_input(path, shapes, seed, config, chunk, compress):
  leaves = {p: random_leaf(s, d, seed * 1000 + i) for i, (p, (s, d)) in enumerate(shapes.items())}
  checkpoint.save_streamed_model_dir(path, leaves, config, chunk_bytes=chunk, compress=compress)


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


def timed_copy(sources, dst):
  """(cp seconds, cp + sync seconds, cp CPU seconds) of `cp -r SOURCES DST`."""
  Path(dst).mkdir()
  t0, cpu0 = time.perf_counter(), cpu_seconds(resource.RUSAGE_CHILDREN)
  subprocess.run(["cp", "-r", *map(str, sources), str(dst)], check=True)
  copied, cpu = time.perf_counter() - t0, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu0
  subprocess.run(["sync", *(str(f) for f in Path(dst).rglob("*") if f.is_file())], check=True)
  return copied, time.perf_counter() - t0, cpu


def timed_mix(recipe, out, chunk):
  """(seconds, peak RSS above the start, CPU seconds) of one mix."""
  cpu0 = cpu_seconds(resource.RUSAGE_SELF)
  seconds, grown = peak_rss_during(lambda: mixing.mix(out, recipe, chunk_bytes=chunk))
  return seconds, grown, cpu_seconds(resource.RUSAGE_SELF) - cpu0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gb", type=float, default=4.2, help="parameter bytes per input checkpoint")
  parser.add_argument("--dir", default="/work/bench_mix", help="scratch directory (deleted at the end)")
  parser.add_argument("--chunk-mb", type=int, default=checkpoint.CHUNK_BYTES >> 20)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--compressed-inputs", action="store_true",
                      help="zstd-compressed inputs, like older model directories")
  parser.add_argument("--keep", action="store_true")
  args = parser.parse_args()
  root, chunk = Path(args.dir), args.chunk_mb << 20
  if root.exists():
    sys.exit(f"{root} exists; remove it or pass another --dir")
  free = shutil.disk_usage(root.parent).free
  if free < 5.5 * args.gb * GB:
    sys.exit(f"{root.parent}: {free / GB:.1f} GB free, need {5.5 * args.gb:.1f} GB (2 inputs, output, 2 copies)")
  config = ml_collections.ConfigDict({"model": {"name": "bench"}})
  shapes = leaf_shapes(args.gb)
  root.mkdir(parents=True)
  try:
    t0 = time.perf_counter()
    inputs = [root / f"in{i}" for i in range(2)]
    for i, path in enumerate(inputs):
      make_input(path, shapes, i, config, chunk, args.compressed_inputs)
    made = time.perf_counter() - t0
    tiny = {"llm/w": ((4, 4), np.float32)}
    for i in range(2):
      make_input(root / f"warm{i}", tiny, i, config, chunk, args.compressed_inputs)
    mixing.mix(root / "warm_out", mixing.Recipe((str(root / "warm0"), str(root / "warm1")), (0.5, 0.5)))
    baseline = rss()

    params = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in shapes.values())
    read = sum(du(path / checkpoint.PARAMS_DIR) for path in inputs)
    print(f"inputs: 2 x {params / GB:.2f} GB of parameters ({read / GB:.2f} GB on disk in all, "
          f"{'zstd' if args.compressed_inputs else 'uncompressed'}), leaves "
          f"{ {p: (list(s), np.dtype(d).name) for p, (s, d) in shapes.items()} }, chunk {args.chunk_mb} MB, "
          f"generated in {made:.0f} s; interpreter baseline RSS {baseline / GB:.2f} GB")
    recipe = mixing.Recipe(tuple(map(str, inputs)), (0.5, 0.5))
    rows = []
    for r in range(args.rounds):
      cp_s, cp_sync_s, cp_cpu = timed_copy(inputs, root / "copy")
      shutil.rmtree(root / "copy")
      mix_s, grown, mix_cpu = timed_mix(recipe, root / "out", chunk)
      written = du(root / "out" / checkpoint.PARAMS_DIR)
      shutil.rmtree(root / "out")
      rows.append((mix_s, grown, mix_cpu, cp_s, cp_sync_s, cp_cpu))
      print(f"round {r}: mix {mix_s:6.1f} s ({params / GB / mix_s:.3f} GB/s of output params; read "
            f"{read / GB:.2f} GB, wrote {written / GB:.2f} GB; CPU {mix_cpu:5.1f} s; peak RSS +{grown / GB:.3f} GB) "
            f"| cp of both inputs {cp_s:5.1f} s, +sync {cp_sync_s:5.1f} s (CPU {cp_cpu:4.1f} s) | mix/cp "
            f"{mix_s / cp_s:.2f}x, mix/(cp+sync) {mix_s / cp_sync_s:.2f}x | load {os.getloadavg()[0]:.1f}")
    best = [min(column) for column in zip(*rows)]
    peak = max(row[1] for row in rows)
    print(f"best rounds: mix {best[0]:.1f} s ({params / GB / best[0]:.3f} GB/s), cp {best[3]:.1f} s, "
          f"cp+sync {best[4]:.1f} s -> mix/cp {best[0] / best[3]:.2f}x, mix/(cp+sync) {best[0] / best[4]:.2f}x "
          f"(target <= 2x); peak RSS +{peak / GB:.3f} GB (target <= 1 GB: {'met' if peak <= GB else 'missed'}); "
          f"{os.cpu_count()} cores")
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  host_memory.restart_with_allocator()  # the allocator the sphinx-jax program runs with
  main()
