"""Throughput of the synthetic world (`sphinx_jax/data/shapes.py`), the demo's embedded data.

Run: python bench/shapes_throughput.py [--seconds 5] [--size 224]
Prints samples/s per domain over all world tasks in turn (image drawn, Record with encoded image, truth),
per wall-clock second and per CPU second of this process (the honest number on a shared machine), and the
ratio of the wall rate to the 200 samples/s the demo needs. Single process.
"""
import argparse
import time

from sphinx_jax import host_memory
from sphinx_jax.data import shapes

TARGET = 200.0


def rate(world, seconds):
  """-> (samples per wall second, samples per CPU second)."""
  n, start, cpu = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - start < seconds:
    world.sample(n // len(shapes.WORLD_TASKS), shapes.WORLD_TASKS[n % len(shapes.WORLD_TASKS)])
    n += 1
  return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=5.0)
  parser.add_argument("--size", type=int, default=224)
  args = parser.parse_args()
  for domain in shapes.DOMAINS:
    wall, cpu = rate(shapes.World(seed=0, domain=domain, sizes=(args.size, args.size)), args.seconds)
    print(f"{domain:9s} {args.size}px  {wall:8.1f} samples/s wall  {cpu:8.1f} per CPU-second  "
          f"wall ratio to target {wall / TARGET:5.2f}")


if __name__ == "__main__":
  host_memory.restart_with_allocator()  # the allocator the sphinx-jax program runs with
  main()
