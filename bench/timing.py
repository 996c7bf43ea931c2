"""Timing shared by the benchmarks on a shared machine: every contender runs once per round, rounds interleaved,
so load from other processes falls on all of them alike; the fastest round of each counts."""
from __future__ import annotations

import time
from typing import Callable


def timed(fn) -> tuple[float, float]:
  """(wall, CPU) seconds of one call; CPU time sums this process's threads (XLA's and torch's pools)."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def warm_up(fns: dict[str, Callable]) -> dict[str, float]:
  """One call of each (compilation, caches); returns its wall seconds (the compile time, mostly)."""
  return {name: timed(fn)[0] for name, fn in fns.items()}


def fastest(fns: dict[str, Callable], iters: int, warm: bool = True) -> dict[str, tuple[float, float]]:
  """Fastest (wall, CPU) seconds of each function over `iters` interleaved rounds, after one warm-up call each
  (skipped with warm=False, for callers that ran `warm_up` themselves)."""
  if warm:
    warm_up(fns)
  best = {name: (float("inf"), float("inf")) for name in fns}
  for _ in range(iters):
    for name, fn in fns.items():
      wall, cpu = timed(fn)
      best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
  return best
