"""Train step: MFU against the machine's matmul roof and time against the PyTorch reference, and the overhead the
real trainer adds over the bare jitted step. Ratios are measured in one run.

Run:  flock /tmp/sphinx_heavy.lock python bench/train.py [--configs demo,mid] [--trainer demo] [--iters 3]
                                                         [--trainer-runs 3]
                                                         [--gemm 2048] [--json FILE]
      python bench/train.py --quick       (smoke run, tests/test_bench_train.py)
Configs (float32, full-precision matmuls: XLA 'highest', torch TF32 off; random weights, which do not change
the work; one host device, as the demo runs): demo = configs/demo.py (tiny SPHINX: the 4 towers at tiny depth,
1 view at 224 px, patch 28, a dim-128 4-layer decoder, 8 rows of 256 decoder positions of which 99 are image
tokens); mid = the demo with a dim-1024, 8-layer, 16-head decoder (FFN 2816) and 2 rows; quick = the demo with only the
two towers of SPHINX-Tiny at depth 1, a 1-layer decoder and 2 rows (cheapest to compile).

Step: the real jitted step of `train/loop.build` (sharded over the mesh, state donated) on batches of the real
data pipeline, pre-fetched to the device; the same step in PyTorch (tests/torch_sphinx.py `TorchSphinx` on the
same config: the towers frozen, i.e. requires_grad off and in eval mode, so autograd records nothing for them,
as under no_grad; masked next-token cross-entropy, backward, global-norm clipping, AdamW over the LLM and fusion
parameters); and the two roof GEMMs of bench/roof.py. All four run in interleaved rounds and the fastest round
of each counts (bench/timing.py). The benchmark checks that both sides train the same number of parameters.
Model FLOPs per step (the MFU numerator) are the trainer's own formula, train/flops.py `step_flops`:
6 x decoder matmul params x positions + causal attention, the fusion projections' forward and weight gradient,
and the frozen towers' forward only. MFU = FLOPs / step time / roof.

Trainer overhead (the configs in --trainer): `train/loop.train` (Grain data with the config's worker process, metrics
every `log_every` steps to metrics.jsonl and TensorBoard, async Orbax checkpoints every `checkpoint_every` steps, no
evaluation) runs one warm-up window plus `steps` steps (CONFIGS) from a model directory of the same random weights
(`train.init_from`, so no init compile; the step itself comes from a persistent compilation cache private to the run,
as the benchmark compiled it already). Its step time is what the loop logs per window (`steps_per_s`: wall time from
one log to the next, everything the host does in between included); the first window (compile) is dropped. Bare: the
jitted step on pre-fetched device batches, timed in windows of `log_every` steps ending in the same sync (metrics
fetched to the host), run before and after each trainer run (`--trainer-runs`, default 3: on a small shared box one
run's overhead swings by up to ~20 points) so that drifting load falls on both. Overhead = mean loop window / mean
bare window - 1 over all runs: every window counts, so each checkpoint save is paid in full (a median would drop the
windows holding a save once fewer than half of them do; it is reported too). The demo's schedule: log every 20 steps,
as configs/demo.py, and a checkpoint every 100 (the demo itself saves every 600), over 200 measured steps. The final
checkpoint's wait, setup and compile are outside every window (reported as train() wall minus the logged windows after
the first). The trainer is measured before the PyTorch steps run in the process: measured after them, its first run
was the slowest of three in six of eight bench runs (by up to 25 points), which four trainer runs without PyTorch
in the process did not show (BENCHMARKS.md, seventeenth session).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np
from flax import linen as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from configs import demo  # noqa: E402
from sphinx_jax import checkpoint  # noqa: E402
from sphinx_jax import config as cfg  # noqa: E402
from sphinx_jax import host_memory  # noqa: E402
from sphinx_jax import sharding as sh  # noqa: E402
from sphinx_jax.data import pipeline  # noqa: E402
from sphinx_jax.data.image import CLIP_MEAN, CLIP_STD  # noqa: E402
from sphinx_jax.data.tokenizer import Tokenizer  # noqa: E402
from sphinx_jax.train import flops as flops_lib  # noqa: E402
from sphinx_jax.train import loop  # noqa: E402
from sphinx_jax.train import state as state_lib  # noqa: E402
from timing import fastest  # noqa: E402  (bench/ is the script's directory)

# torch and the reference towers are imported where they are used: the data pipeline's worker processes
# re-import this script, and would each spend seconds importing them for nothing.

TORCH_TOWERS = ("clip", "openclip_convnext_xxl", "dinov2_vitg14", "qformer")  # TorchSphinx's frozen modules
JAX_TRAINED = ("llm", "fusion")  # trainable="stage2" (train/optimizer.py TRAINABLE_PRESETS)


# --- configs ----------------------------------------------------------------------------------------------

def demo_config():
  return demo.get_config()


def mid_config():
  c = demo.get_config()
  c.model.llm.update(dim=1024, n_layers=8, n_heads=16, n_kv_heads=16, multiple_of=256)
  c.data.global_batch_size = 2
  c.train.llm_from = ""  # the demo's pre-trained decoder is dim 128; speed needs no weights
  c.train.cpu_library_fusions = True  # YNNPACK runs the dim-1024 products faster (BENCHMARKS.md)
  return c


def quick_config():
  """The demo at its cheapest to compile: the two towers of SPHINX-Tiny at depth 1, a 1-layer decoder, 2 rows."""
  c = demo.get_config()
  c.model.towers = ("convnext", "dinov2")
  c.model.convnext.depths = (1, 1, 1, 1)
  c.model.dinov2.depth = 1
  c.model.llm.update(n_layers=1)
  c.data.global_batch_size = 2
  # the demo's pre-trained towers and decoder are at full tiny depth; speed needs no weights
  c.train.towers_from = c.train.llm_from = ""
  return c


# name -> (config, the trainer run's (log_every, checkpoint_every, measured steps))
CONFIGS = {
    "demo": (demo_config, (20, 100, 200)),
    "mid": (mid_config, (2, 4, 4)),
    "quick": (quick_config, (2, 2, 4)),
}


def bench_config(name: str, schedule):
  """The config, its train section set to the trainer run's schedule: the step bakes in the learning-rate
  schedule, so the bare step and the trainer's must be built from the same numbers to compile alike."""
  c = CONFIGS[name][0]()
  log_every, checkpoint_every, steps = schedule
  c.train.update(num_steps=log_every + steps, log_every=log_every, checkpoint_every=checkpoint_every, eval_every=0,
                 export_to="")
  return c


# --- JAX side ---------------------------------------------------------------------------------------------

def random_params(abstract, shardings, seed: int):
  """Random params placed on the mesh, drawn on the host (no init compile): N(0, 0.02) everywhere, norm scales
  (LayerNorm `scale`, RMSNorm `weight` under a `*norm` module) 1."""
  rng = np.random.default_rng(seed)

  def leaf(path, a, sharding):
    names = [getattr(k, "key", "") for k in path]
    norm = names[-1] == "scale" or (names[-1] == "weight" and len(names) > 1 and names[-2].endswith("norm"))
    value = np.ones(a.shape, a.dtype) if norm else (0.02 * rng.standard_normal(a.shape)).astype(a.dtype)
    return jax.device_put(value, sharding)
  return jax.tree_util.tree_map_with_path(leaf, abstract, shardings)


def host_batches(config, count: int) -> list[dict]:
  """`count` batches of the config's data pipeline (numpy, per process), its worker processes closed after."""
  tokenizer = Tokenizer.from_file(config.data.tokenizer)
  data = pipeline.make_iterator(config.data, tokenizer, image_size=config.model.image_size,
                                image_words=cfg.image_tokens(config.model))
  try:  # copies: the pipeline's arrays live in shared memory, released only with the arrays themselves
    return [{k: np.array(v) for k, v in next(data).items()} for _ in range(count)]
  finally:
    data.close()


class BareStep:
  """The jitted step over pre-fetched device batches, cycling; `run(n)` runs n steps and fetches the last
  metrics to the host (the sync a logging step of the trainer ends with)."""

  def __init__(self, program, state, batches):
    self.program, self.state, self.batches, self.calls = program, state, batches, 0

  def run(self, steps: int = 1) -> dict:
    for _ in range(steps):
      self.state, metrics = self.program.step(self.state, self.batches[self.calls % len(self.batches)])
      self.calls += 1
    return jax.device_get(metrics)

  def windows(self, count: int, size: int) -> list[float]:
    """Seconds per step of `count` windows of `size` steps each."""
    out = []
    for _ in range(count):
      start = time.perf_counter()
      metrics = self.run(size)
      out.append((time.perf_counter() - start) / size)
      if not np.isfinite(metrics["loss"]):
        raise SystemExit(f"bench/train.py: non-finite loss {metrics['loss']} in the bare step.")
    return out


def trained_count(params) -> int:
  return sum(int(np.prod(x.shape)) for part in JAX_TRAINED for x in jax.tree.leaves(params[part]))


# --- PyTorch side -----------------------------------------------------------------------------------------

def torch_inputs(batch: dict) -> tuple:
  """(tokens long[B, T], loss_mask bool[B, T], images float[B, 3, S, S] CLIP-normalised) of a pipeline batch."""
  import torch
  pixels = batch["images"].astype(np.float32) / np.float32(255.0)
  images = (pixels - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
  return (torch.from_numpy(batch["tokens"].astype(np.int64)), torch.from_numpy(batch["loss_mask"]),
          torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


class TorchStep:
  """forward (frozen towers) + masked next-token CE + backward + clipping + AdamW on the composed TorchSphinx."""

  def __init__(self, config, batches):
    import torch
    # the composed PyTorch SPHINX of the parity tests, so the reference is what the tests check
    from torch_sphinx import TorchSphinx, randomise
    self.model = TorchSphinx(config.model)
    randomise(self.model, 0)
    self.model.train()
    for name in TORCH_TOWERS:
      if hasattr(self.model, name):
        getattr(self.model, name).requires_grad_(False).eval()
    self.trainable = [p for p in self.model.parameters() if p.requires_grad]
    t = config.train
    self.clip = t.clip_grad
    self.opt = torch.optim.AdamW(self.trainable, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps, weight_decay=t.weight_decay)
    self.inputs = [torch_inputs(b) for b in batches]
    self.calls = 0

  def trained_count(self) -> int:
    return sum(p.numel() for p in self.trainable)

  def run(self) -> float:
    import torch
    tokens, mask, images = self.inputs[self.calls % len(self.inputs)]
    self.calls += 1
    logits = self.model(tokens, self.model.encode_image(images))
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    weights = mask[:, 1:].flatten().float()
    loss = (nll * weights).sum() / weights.sum().clamp(min=1.0)
    loss.backward()
    if self.clip:
      torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.item()


# --- the two measurements ---------------------------------------------------------------------------------

def step_shape(config, batch: dict) -> tuple[int, int]:
  """(rows, decoder positions per row): a row's text tokens plus the image tokens the model inserts."""
  rows, text = batch["tokens"].shape
  return rows, text + cfg.image_tokens(config.model)


def measure_step(config, bare: BareStep, batches, iters: int, gemm: int) -> dict:
  from roof import gemms, roof as measured_roof
  torch_step = TorchStep(config, batches)
  jax_count, torch_count = trained_count(bare.state.params), torch_step.trained_count()
  if jax_count != torch_count:
    raise SystemExit(f"bench/train.py: JAX trains {jax_count} parameters, torch {torch_count}; the two steps "
                     f"must train the same set.")
  best = fastest({"jax step": bare.run, "torch step": torch_step.run, **gemms("float32", gemm)}, iters)
  roof, roof_name = measured_roof(best, gemm)
  rows, positions = step_shape(config, batches[0])
  flops = flops_lib.step_flops(config.model, rows, positions)
  (t_jax, c_jax), (t_torch, c_torch) = best["jax step"], best["torch step"]
  return dict(flops=flops, rows=rows, positions=positions, trained_params=jax_count, roof=roof, roof_name=roof_name,
              jax_s=t_jax, torch_s=t_torch, jax_cpu_s=c_jax, torch_cpu_s=c_torch, jax_mfu=flops / t_jax / roof,
              torch_mfu=flops / t_torch / roof)


def loop_windows(workdir: Path) -> list[float]:
  """Seconds per step of each window the trainer logged (metrics.jsonl steps_per_s), in order."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [1.0 / r["steps_per_s"] for r in records if "steps_per_s" in r]


def trainer_run(config, init: Path, workdir: Path) -> list[float]:
  """One `train()` from `init` into `workdir`: its logged windows after the first (compile), seconds per step."""
  c = config.copy_and_resolve_references()
  c.train.init_from = str(init)
  summary = loop.train(c, workdir)
  logged = loop_windows(workdir)
  windows = (config.train.num_steps - config.train.log_every) // config.train.log_every
  if len(logged) != windows + 1 or not np.isfinite(summary["loss"]):
    raise SystemExit(f"bench/train.py: the trainer logged {len(logged)} windows (expected {windows + 1}) and loss "
                     f"{summary['loss']}.")
  return logged[1:]


def measure_trainer(config, bare: BareStep, params, scratch: Path, runs: int) -> dict:
  """`runs` trainer runs, each between two sets of bare windows (the set after one run is the set before the
  next), so that the box's drift falls on both sides; pooled overhead = mean of all loop windows / mean of all
  bare windows - 1, and each run's against its own two sets."""
  log_every, checkpoint_every = config.train.log_every, config.train.checkpoint_every
  steps = config.train.num_steps - log_every
  init = checkpoint.save_model_dir(scratch / "init", params, config)
  bare_sets = [bare.windows(steps // log_every, log_every)]
  loop_sets, walls = [], []
  for run in range(runs):
    start = time.perf_counter()
    loop_sets.append(trainer_run(config, init, scratch / f"run{run}"))
    walls.append(time.perf_counter() - start)
    bare_sets.append(bare.windows(steps // log_every, log_every))
  saved = sorted(int(p.name) for p in (scratch / "run0" / "checkpoints").iterdir() if p.name.isdigit())
  loop_all, bare_all = sum(loop_sets, []), sum(bare_sets, [])
  per_run = [statistics.mean(w) / statistics.mean(bare_sets[i] + bare_sets[i + 1]) - 1
             for i, w in enumerate(loop_sets)]
  loop_s, bare_s = statistics.mean(loop_all), statistics.mean(bare_all)
  return dict(loop_s=loop_s, bare_s=bare_s, overhead=loop_s / bare_s - 1, run_overheads=per_run,
              median_overhead=statistics.median(loop_all) / statistics.median(bare_all) - 1,
              loop_windows=loop_all, bare_windows=bare_all, checkpoints=saved, train_wall_s=walls,
              outside_windows_s=[wall - log_every * sum(w) for wall, w in zip(walls, loop_sets)],
              log_every=log_every, checkpoint_every=checkpoint_every, steps=steps, runs=runs,
              workers=config.data.num_workers)


def run_config(name: str, args) -> dict:
  trainer = name in args.trainer.split(",")
  config = bench_config(name, CONFIGS[name][1])
  cfg.validate(config, num_devices=jax.device_count())
  mesh, rules = sh.make_mesh(config.mesh), sh.rules_from_config(config)
  host = host_batches(config, 4)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    program = loop.build(config, mesh, rules)
    params = random_params(program.abstract_state.params, program.state_shardings.params, config.seed)
    state = jax.jit(partial(state_lib.create, tx=program.tx), out_shardings=program.state_shardings)(params)
    params = jax.device_get(params) if trainer else None  # for the trainer's init_from (the state is donated)
    bare = BareStep(program, state, [loop.to_global(b, program.batch_sharding) for b in host])
    start = time.perf_counter()
    bare.run()
    compile_s = time.perf_counter() - start
    if not trainer:
      return dict(config=name, compile_s=compile_s, **measure_step(config, bare, host, args.iters, args.gemm))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as scratch:  # before any PyTorch step: see above
      overhead = measure_trainer(config, bare, params, Path(scratch), args.trainer_runs)
    step = measure_step(config, bare, host, args.iters, args.gemm)
  return dict(config=name, compile_s=compile_s, **step, trainer=overhead)


def report(r: dict) -> None:
  print(f"{r['config']}: {r['flops'] / 1e9:.1f} GFLOP/step, {r['trained_params'] / 1e6:.2f} M trained params, "
        f"step compile {r['compile_s']:.0f} s\n"
        f"  roof {r['roof'] / 1e9:.1f} GFLOP/s ({r['roof_name']})\n"
        f"  JAX step   {r['jax_s']:8.3f} s  {r['flops'] / r['jax_s'] / 1e9:7.1f} GFLOP/s  {r['jax_mfu']:6.1%} of roof\n"
        f"  torch step {r['torch_s']:8.3f} s  {r['flops'] / r['torch_s'] / 1e9:7.1f} GFLOP/s  "
        f"{r['torch_mfu']:6.1%} of roof\n"
        f"  JAX/torch time: wall {r['jax_s'] / r['torch_s']:.2f}, CPU {r['jax_cpu_s'] / r['torch_cpu_s']:.2f}",
        flush=True)
  if "trainer" not in r:
    return
  t = r["trainer"]
  print(f"  trainer ({t['workers']} data worker, log every {t['log_every']}, async checkpoint every "
        f"{t['checkpoint_every']}, {t['steps']} steps, {t['runs']} run(s)): {t['loop_s']:.3f} s/step vs bare "
        f"{t['bare_s']:.3f} s/step (means) -> overhead {t['overhead']:+.1%} (per run "
        f"{', '.join('%+.1f%%' % (100 * o) for o in t['run_overheads'])}; of the medians "
        f"{t['median_overhead']:+.1%})\n"
        f"    loop windows {['%.3f' % w for w in t['loop_windows']]}, bare {['%.3f' % w for w in t['bare_windows']]}"
        f"; checkpoints {t['checkpoints']}; train() wall {['%.1f' % w for w in t['train_wall_s']]} s, "
        f"{['%.1f' % w for w in t['outside_windows_s']]} s of it outside the measured windows", flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="demo,mid")
  parser.add_argument("--quick", action="store_true", help="the smoke config only")
  parser.add_argument("--trainer", default="demo,quick", help="configs whose trainer overhead is measured too")
  parser.add_argument("--trainer-runs", type=int, default=3,
                      help="trainer runs per config, each between sets of bare windows (the box drifts)")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--gemm", type=int, default=2048, help="side of the roof GEMM")
  parser.add_argument("--json", help="also write the results here")
  args = parser.parse_args(argv)
  names = ["quick"] if args.quick else args.configs.split(",")
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    sys.exit(f"bench/train.py: unknown config(s) {unknown}; choose from {sorted(CONFIGS)}.")
  import torch
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = False
  cache = tempfile.TemporaryDirectory(prefix="bench_train_xla_")
  # train() compiles the step the benchmark already compiled; a persistent cache for this run makes that a load
  # (compilation is outside every timed window either way, this only saves minutes).
  jax.config.update("jax_compilation_cache_dir", cache.name)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  print(f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s), torch "
        f"{torch.__version__} threads {torch.get_num_threads()}, host allocator {host_memory.loaded_allocator()}, "
        f"load {os.getloadavg()[0]:.1f}", flush=True)
  results = []
  for name in names:
    results.append(run_config(name, args))
    report(results[-1])
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=1))
  cache.cleanup()


if __name__ == "__main__":
  host_memory.restart_with_allocator()  # the allocator the sphinx-jax program runs with
  main()
