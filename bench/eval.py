"""Batched vs one-at-a-time greedy short-answer eval: samples/s of `sphinx-jax eval` (eval/runner.py `evaluate`)
at --batch rows per generate call and at 1, on the same model, fixture and machine, interleaved round by round.

Run:  flock /tmp/sphinx_heavy.lock python bench/eval.py [--models tiny,mid] [--questions 32] [--batch 16]
                                                        [--rounds 2] [--quick]
Models (5 views at 448 px: the SPHINX-1k structure; random weights, scaled by fan-in so that activations stay
finite; the demo SentencePiece tokenizer, vocabulary 768), by what differs from tiny_sphinx_1k (MODELS):
  tiny   configs/sphinx.py:tiny_sphinx_1k as is (decoder dim 64, 2 layers; all four towers at width 16-128)
  mid    decoder dim 512, 8 layers, 8 heads, FFN 1536; towers at width 256-512, depth 2
  quick  DINOv2 alone with 28-px patches (the smoke test's model; seconds of CPU)
Fixture: a VQAv2-format short-answer set (official file names and image layout, split `shapes2026`) written by
data/shapes.py `write_vqav2` from the synthetic world, --questions questions, one scene each.
Each pass is a whole `evaluate` run (annotation reading, image loading, prompts, generation, scoring, the
predictions file) into a fresh output file, greedy, the benchmark's max_new_tokens (VQAv2: 10).
Timing: first a warm-up pass per batch size on the first --batch questions (compiles; reported apart with the
number of programs compiled), then --rounds rounds, each timing the batched and the one-at-a-time pass on all
questions back to back; the fastest round of each counts (others share this machine). A compile during the
timed passes fails the run. Beside it, seconds per sample of generation with one new token instead of
max_new_tokens on the first --batch questions at both batch sizes: the prefill (towers, image block, prompt),
the part that batching does not amortise where a batch-1 prefill already keeps the machine busy.
Answers: every pass's outputs (warm-up included) must equal the first timed batched pass's, id by id; any
difference is printed and the script exits 1. Random weights rarely emit EOS or "\\n###", so both paths run to
max_new_tokens.
--quick: model quick, 6 questions, batch 4 (the last batch padded by the runner), one round.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import sphinx_jax
from configs.sphinx import get_config
from sphinx_jax import checkpoint
from sphinx_jax import config as cfg
from sphinx_jax import host_memory
from sphinx_jax import sharding as sh
from sphinx_jax.data import conversation, shapes
from sphinx_jax.eval import benchmarks, runner
from sphinx_jax.models import sphinx as sphinx_model

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "configs" / "assets" / "demo_tokenizer.model"
VOCAB = 768  # the demo tokenizer's; generated ids must decode
BENCHMARK = "vqav2"
MODELS = {  # name -> what differs from tiny_sphinx_1k, by config section
    "tiny": {},
    "mid": dict(
        llm=dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=1536),
        clip=dict(width=256, layers=2, heads=4, mlp_dim=1024),
        convnext=dict(depths=(1, 1, 2, 1), dims=(64, 128, 256, 512)),
        dinov2=dict(width=256, depth=2, heads=4, mlp_hidden=512),
        qformer=dict(vision=dict(width=256, layers=2, heads=4, mlp_dim=1024),
                     qformer=dict(hidden=256, layers=2, heads=4, intermediate=1024))),
    # 5 views, DINOv2 alone with 28-px patches (67 positions a view): seconds of CPU, for the smoke test
    "quick": dict(model=dict(towers=("dinov2",)), dinov2=dict(patch=28)),
}


# ------------------------------------------------------------------------------------------------- models
def model_config(name: str):
  """tiny_sphinx_1k at the demo tokenizer's vocabulary, widened to the 'mid' sizes or cut to 'quick'."""
  config = get_config("tiny_sphinx_1k")
  config.model.llm.vocab_size = VOCAB
  for section, fields in MODELS[name].items():
    (config.model if section == "model" else config.model[section]).update(fields)
  cfg.validate(config)
  return config


def random_params(model_config, seed: int = 0):
  """Random weights without compiling `init`: the decoder's token embedding N(0, 1), matrices N(0, 1/fan_in)
  (fan_in = all axes but the last, minus a scanned leading depth axis), norm scales 1 + N(0, 0.2), the rest
  N(0, 0.2). Returns a nested dict of float32 numpy arrays."""
  side = model_config.image_size
  abstract = jax.eval_shape(sphinx_model.Sphinx(model_config).init, jax.random.key(0),
                            jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, side, side, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.standard_normal(leaf.shape, np.float32)
    name = jax.tree_util.keystr(path)
    if "embedding" in name and "llm" in name:
      return noise
    if leaf.ndim >= 2:
      stacked = "layers" in name or "blocks" in name
      return noise / np.float32(np.sqrt(np.prod(leaf.shape[1 if stacked else 0:-1])))
    return 1 + 0.2 * noise if "scale" in name or "weight" in name else 0.2 * noise

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract)["params"])


# ------------------------------------------------------------------------------------------------ fixture
def write_fixture(count: int, data: Path) -> tuple[Path, str]:
  """Questions 0..count-1 of `write_vqav2`, moved into the official VQAv2 layout that eval/benchmarks.py
  `read_vqav2` reads. Returns (data directory, split)."""
  split = shapes.VQA_SUBTYPE
  raw = Path(shapes.write_vqav2(shapes.World(seed=0), count, data.with_name(data.name + "_raw")))
  data.mkdir()
  os.rename(raw / "questions.json", data / f"v2_OpenEnded_mscoco_{split}_questions.json")
  os.rename(raw / "annotations.json", data / f"v2_mscoco_{split}_annotations.json")
  os.rename(raw / "images", data / split)
  return data, split


# ------------------------------------------------------------------------------------------------- timing
def eval_pass(handle, data: Path, split: str, batch: int, out: Path) -> tuple[float, dict[str, str]]:
  """One whole `evaluate` run into a fresh file -> (seconds, {id: output})."""
  start = time.perf_counter()
  runner.evaluate(handle, BENCHMARK, data, out, split=split, batch_size=batch, progress=False)
  seconds = time.perf_counter() - start
  return seconds, {row["id"]: row["output"] for row in map(json.loads, out.read_text().splitlines())}


def differences(reference: dict[str, str], got: dict[str, str]) -> list[str]:
  """One line per id of `got` whose answer is not the reference's."""
  return [f"  id {i}: {reference[i]!r} vs {got[i]!r}" for i in got if got[i] != reference[i]]


def prefill_seconds(handle, data: Path, split: str, batch: int, sizes) -> dict[int, float]:
  """Seconds per sample of generation with max_new_tokens=1 (towers, image block and prompt through the decoder,
  one token out) over the first `batch` samples, in chunks of each size: the part of a pass that batching
  cannot shrink where the machine is already busy at batch 1. Same compiled programs as the eval passes."""
  samples = benchmarks.get(BENCHMARK).read(data, split)[:batch]
  ids = [handle.tokenizer.encode(conversation.render_prompt([], s.question, s.prefill), bos=True, eos=False)
         for s in samples]
  pixels = np.stack([handle.pixels(s.image) for s in samples])
  out = {}
  for size in sizes:
    start = time.perf_counter()
    for i in range(0, len(ids), size):
      handle.generator.generate_ids(ids[i:i + size], pixels[i:i + size], max_new_tokens=1)
    out[size] = (time.perf_counter() - start) / len(ids)
  return out


def measure(handle, fixture, warm_fixture, batch: int, rounds: int, work: Path) -> dict:
  """Warm-up passes on `warm_fixture` (compiles every program the timed passes use), then `rounds` rounds of a
  batched and a one-at-a-time pass on `fixture`, back to back. Returns rates, warm-up seconds, programs
  compiled during warm-up and during the timed rounds (must be 0), and every answer that differs from the
  first batched pass."""
  outputs = (work / f"pass{i}.jsonl" for i in range(10 ** 6))
  generator, sizes = handle.generator, (batch, 1)
  warm, compiled, warm_answers = {}, {}, []
  for size in sizes:
    before = generator.traces
    warm[size], answers = eval_pass(handle, *warm_fixture, size, next(outputs))
    compiled[size] = generator.traces - before
    warm_answers.append(answers)
  before = generator.traces
  times, passes = {size: [] for size in sizes}, []
  for _ in range(rounds):
    for size in sizes:
      seconds, answers = eval_pass(handle, *fixture, size, next(outputs))
      times[size].append(seconds)
      passes.append(answers)
  timed_compiles = generator.traces - before
  reference = passes[0]
  mismatches = [line for answers in passes[1:] + warm_answers for line in differences(reference, answers)]
  n = len(reference)
  return dict(samples=n, rate={k: n / min(v) for k, v in times.items()}, warm=warm, compiled=compiled,
              timed_compiles=timed_compiles, mismatches=mismatches, distinct=len(set(reference.values())),
              example=next(iter(reference.values())), prefill=prefill_seconds(handle, *fixture, batch, sizes))


def report(name: str, params: int, batch: int, r: dict) -> str:
  new = benchmarks.get(BENCHMARK).max_new_tokens
  lines = [f"{name}: {params / 1e6:.1f}M params, {r['samples']} samples, ratio batch {batch} / batch 1 = "
           f"x{r['rate'][batch] / r['rate'][1]:.2f}, answers identical: {'yes' if not r['mismatches'] else 'NO'} "
           f"({r['distinct']} distinct answers, e.g. {r['example']!r}), programs compiled in the timed passes: "
           f"{r['timed_compiles']}"]
  for size in (batch, 1):
    lines.append(f"  batch {size:2d}: {r['rate'][size]:7.2f} samples/s ({1000 / r['rate'][size]:6.0f} ms/sample; "
                 f"{1000 * r['prefill'][size]:6.0f} ms/sample with 1 new token instead of {new})  warm-up "
                 f"{r['warm'][size]:6.1f} s ({r['compiled'][size]} program(s) compiled, {batch} samples)")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="tiny,mid", help=f"comma-separated, of {sorted(MODELS)}")
  parser.add_argument("--questions", type=int, default=32)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--quick", action="store_true", help="the smoke test's run: model 'quick', 6 questions, "
                      "batch 4, one round")
  args = parser.parse_args(argv)
  if args.quick:
    args.models, args.questions, args.batch, args.rounds = "quick", 6, 4, 1
  jax.config.update("jax_default_matmul_precision", "highest")
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cpus), load "
        f"{' '.join(open('/proc/loadavg').read().split()[:3])}; {BENCHMARK} fixture of {args.questions} questions, "
        f"greedy, float32", flush=True)
  failed = False
  with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
    work = Path(tmp)
    fixture = write_fixture(args.questions, work / "vqav2")
    warm_fixture = write_fixture(args.batch, work / "vqav2_warm")  # the first --batch questions
    for name in args.models.split(","):
      config = model_config(name)
      params = random_params(config.model)
      handle = sphinx_jax.load(checkpoint.save_model_dir(work / name, params, config, tokenizer=TOKENIZER))
      r = measure(handle, fixture, warm_fixture, args.batch, args.rounds, work)
      print(report(name, sh.count_params(params), args.batch, r), flush=True)
      if r["mismatches"] or r["timed_compiles"]:
        failed = True
        print(f"FAILED {name}: {len(r['mismatches'])} answers differ from the first batched pass, "
              f"{r['timed_compiles']} compiles in the timed passes\n" + "\n".join(r["mismatches"]), flush=True)
      del handle, params
  print(f"load {' '.join(open('/proc/loadavg').read().split()[:3])} at the end")
  return 1 if failed else 0


if __name__ == "__main__":
  host_memory.restart_with_allocator()  # the allocator the sphinx-jax program runs with
  sys.exit(main())
