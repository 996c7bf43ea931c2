"""`sphinx-jax compile`: ahead-of-time compilation of real-size SPHINX steps for a TPU topology, from any host.

The idea of MaxText's `train_compile`: XLA compiles for a TPU slice described by libtpu (sphinx_jax/topology.py)
without the slice, so one learns on a CPU host whether a configuration fits in HBM and how it is sharded.
Nothing is materialised: the train state is the abstract state of `train.loop.build`, every input a
`jax.ShapeDtypeStruct` carrying its sharding.

Steps compiled (`--steps`, default all):
  train    the stage-2 step of `sphinx-jax train`: towers forward (frozen) + fusion + decoder forward/backward +
           AdamW, on config.data.global_batch_size rows of config.data.max_len decoder positions (image ones
           included, as data/pipeline.py batches them) and one image each.
  prefill  generation's first call (inference/generate.py `prefill`): images and a prompt of half the text
           budget (max_len - image positions) into a KV cache of max_len slots; weights in the compute dtype.
  decode   one KV-cached token of generation (`step`) with that cache.
Per step and chip: the compiler's memory analysis (arguments, outputs, aliased, temporaries, generated code;
peak = arguments + outputs - aliased + temporaries + code), against the chip's HBM. A step the compiler
refuses with RESOURCE_EXHAUSTED is reported as not fitting with the compiler's numbers, exit code 3.
Then the analytic FLOPs per train step (train/flops.py) and the step time and tokens/s/chip they imply at
`--mfu` (tokens = decoder positions, image positions included).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from sphinx_jax import config as cfg
from sphinx_jax import sharding as sh
from sphinx_jax import topology as topo
from sphinx_jax.errors import SphinxError

STEPS = ("train", "prefill", "decode")
NOT_FITTING = 3  # exit code of a configuration that does not fit
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


@dataclasses.dataclass
class StepReport:
  """One compiled (or refused) step; sizes in bytes per chip."""
  name: str
  fits: bool
  compile_s: float
  hbm: int
  arguments: int = 0
  outputs: int = 0
  aliased: int = 0
  temporaries: int = 0
  code: int = 0
  used: int | None = None  # the compiler's own total when it refused the step
  message: str = ""

  @property
  def peak(self) -> int:
    if self.used is not None:
      return self.used
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclasses.dataclass
class Report:
  variant: str
  topology: topo.Topology
  mesh: dict
  rows: int
  max_len: int
  image_tokens: int
  accum_steps: int
  remat: str
  steps: list
  train_flops: float
  mfu: float

  @property
  def fits(self) -> bool:
    return all(s.fits for s in self.steps)

  @property
  def step_time(self) -> float:
    """Seconds per train step at `mfu` of the slice's peak."""
    return self.train_flops / (self.mfu * self.topology.generation.peak_flops * self.topology.chips)

  @property
  def tokens_per_chip_s(self) -> float:
    return self.rows * self.max_len / self.step_time / self.topology.chips  # image positions included


# ------------------------------------------------------------------------------------------- pure helpers
def parse_size(text: str) -> int:
  """'95.74G' -> bytes (the compiler's units are powers of 1024)."""
  number, unit = re.fullmatch(r"([\d.]+)\s*([KMGT]?)i?B?", text.strip()).groups()
  return int(float(number) * _UNITS[unit])


# The TPU compiler's two RESOURCE_EXHAUSTED forms: the whole program, or its temporaries alone.
_OOM_PATTERNS = (
    r"Used ([\d.]+[KMGT]?) of ([\d.]+[KMGT]?) hbm",
    r"required for HLO temporaries \(([\d.]+[KMGT]?)\) exceeds available HBM \(([\d.]+[KMGT]?)\)",
)


def parse_oom(message: str) -> tuple[int, int] | None:
  """(needed, capacity) in bytes from XLA's RESOURCE_EXHAUSTED text, e.g. 'Used 150.20G of 95.74G hbm.' or
  'the total memory required for HLO temporaries (72.52G) exceeds available HBM (15.75G)'."""
  for pattern in _OOM_PATTERNS:
    match = re.search(pattern, message)
    if match:
      return parse_size(match.group(1)), parse_size(match.group(2))
  return None


def memory_report(name: str, compiled, compile_s: float, hbm: int) -> StepReport:
  m = compiled.memory_analysis()
  report = StepReport(name, True, compile_s, hbm, m.argument_size_in_bytes, m.output_size_in_bytes,
                      m.alias_size_in_bytes, m.temp_size_in_bytes, m.generated_code_size_in_bytes)
  report.fits = report.peak <= hbm
  return report


def compile_step(name: str, lower, hbm: int) -> StepReport:
  """Lowers and compiles one step; RESOURCE_EXHAUSTED becomes a not-fitting report with the compiler's numbers."""
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except jax.errors.JaxRuntimeError as error:
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    numbers = parse_oom(text)
    used, capacity = numbers if numbers else (None, hbm)
    line = next(ln.strip() for ln in text.splitlines() if "RESOURCE_EXHAUSTED" in ln)
    return StepReport(name, False, time.perf_counter() - start, capacity, used=used, message=line)
  return memory_report(name, compiled, time.perf_counter() - start, hbm)


def check_batch(config, mesh) -> None:
  rows = config.data.global_batch_size
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % ways:
    raise SphinxError(f"config.data.global_batch_size={rows} does not split over the {ways} batch shards "
                      f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); use a multiple of {ways}.")


def train_inputs(config, sharding) -> dict:
  """The abstract image batch of data/pipeline.py: tokens, loss_mask [B, max_len - image_words] (the image
  positions complete the decoder's max_len), uint8 images, has_image [B]."""
  b, side = config.data.global_batch_size, config.model.image_size
  length = config.data.max_len - cfg.image_tokens(config.model)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
  return dict(tokens=spec((b, length), jnp.int32), loss_mask=spec((b, length), bool),
              images=spec((b, side, side, 3), jnp.uint8), has_image=spec((b,), bool))


def compute_dtype_params(abstract_params, dtype):
  """Inference holds every floating weight in the compute dtype."""
  def cast(a):
    return jax.ShapeDtypeStruct(a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype,
                                sharding=a.sharding)
  return jax.tree.map(cast, abstract_params)


def cache_shardings(mesh, rules) -> dict:
  """KV cache of models/llama.py `init_cache`: k [L, B, K, H, S], v [L, B, K, S, H]; positions, segments [B, S];
  index []."""
  named = lambda *axes: nn.logical_to_mesh_sharding(PartitionSpec(*axes), mesh, rules)  # noqa: E731
  rows = named(sh.BATCH, sh.LENGTH)
  return {"k": named(sh.LAYERS, sh.BATCH, sh.KV_HEADS, sh.HEAD_DIM, sh.LENGTH),
          "v": named(sh.LAYERS, sh.BATCH, sh.KV_HEADS, sh.LENGTH, sh.HEAD_DIM), "positions": rows, "segments": rows,
          "index": NamedSharding(mesh, PartitionSpec())}


# ----------------------------------------------------------------------------------------------- lowering
def lower_train(program, config):
  state = program.placed_state()
  return lambda: program.step.lower(state, train_inputs(config, program.batch_sharding))


def lower_generation(program, config, mesh, rules):
  """(lower prefill, lower decode) for global_batch_size rows."""
  from sphinx_jax.inference import generate
  model, rows = program.model, config.data.global_batch_size
  image_words = cfg.image_tokens(config.model)
  cache_len, prompt = config.data.max_len, (config.data.max_len - image_words) // 2
  params = compute_dtype_params(program.placed_state().params, jnp.dtype(config.model.dtype))
  batch = program.batch_sharding
  replicated = NamedSharding(mesh, PartitionSpec())
  caches = cache_shardings(mesh, rules)
  spec = lambda shape, dtype, sharding=batch: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
  side = config.model.image_size

  def prefill(params, tokens, lengths, images, has_image):
    return generate.prefill(model, params, tokens, lengths, images, has_image, cache_len)

  def decode(params, token, position, cache, key, temperature, top_p):
    return generate.step(model, params, token, position, cache, key, temperature, top_p)

  prefill_jit = jax.jit(prefill, out_shardings=(batch, caches, batch))
  decode_jit = jax.jit(decode, out_shardings=(batch, caches), donate_argnums=(3,))
  cache = sh.placed_abstract(jax.eval_shape(lambda: _empty_cache(config, rows, cache_len)), caches)
  key = jax.eval_shape(lambda: jax.random.key(0))
  scalar = spec((), jnp.float32, replicated)
  lower_prefill = lambda: prefill_jit.lower(  # noqa: E731
      params, spec((rows, prompt), jnp.int32), spec((rows,), jnp.int32), spec((rows, side, side, 3), jnp.uint8),
      spec((rows,), bool))
  lower_decode = lambda: decode_jit.lower(  # noqa: E731
      params, spec((rows,), jnp.int32), spec((rows,), jnp.int32), cache, spec(key.shape, key.dtype, replicated),
      scalar, scalar)
  return lower_prefill, lower_decode


def _empty_cache(config, rows, cache_len):
  from sphinx_jax.models.llama import init_cache
  return init_cache(config.model.llm, rows, cache_len, jnp.dtype(config.model.dtype))


# ---------------------------------------------------------------------------------------------- the command
def run(config, topology_name: str, *, num_slices: int = 1, steps=STEPS, mfu: float = 0.4) -> Report:
  """Compiles `steps` of `config` for the topology and returns what the compiler and the FLOP count say."""
  from sphinx_jax.train import flops as flops_lib
  from sphinx_jax.train import loop

  unknown = [s for s in steps if s not in STEPS]
  if unknown:
    raise SphinxError(f"--steps: unknown {unknown}; choose from {list(STEPS)}.")
  if not 0 < mfu <= 1:
    raise SphinxError(f"--mfu {mfu}: give a fraction of peak in (0, 1], e.g. 0.4.")
  topology = topo.describe(topology_name, num_slices)
  cfg.validate(config, num_devices=topology.chips // num_slices, training=True)
  mesh = topo.topology_mesh(config.mesh, topology)
  check_batch(config, mesh)
  rules = sh.rules_from_config(config)
  hbm = topology.generation.hbm_bytes
  reports = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    program = loop.build(config, mesh, rules)
    lowerers = {"train": lower_train(program, config)}
    if "prefill" in steps or "decode" in steps:
      lowerers["prefill"], lowerers["decode"] = lower_generation(program, config, mesh, rules)
    for name in steps:
      reports.append(compile_step(name, lowerers[name], hbm))
  image_words = cfg.image_tokens(config.model)
  rows, length = config.data.global_batch_size, config.data.max_len
  return Report(
      variant=config.model.get("variant", "?"), topology=topology, mesh=dict(mesh.shape), rows=rows,
      max_len=length, image_tokens=image_words, accum_steps=config.train.accum_steps,
      remat=config.model.llm.remat_policy, steps=reports,
      train_flops=flops_lib.step_flops(config.model, rows, length), mfu=mfu)


def _gib(n: int) -> str:
  return f"{n / topo.GIB:.2f}"


def format_report(r: Report) -> str:
  t, g = r.topology, r.topology.generation
  slices = f" x {t.num_slices} slices" if t.num_slices > 1 else ""
  lines = [
      f"{r.variant} on {t.name}{slices}: {t.chips} chips ({t.devices[0].device_kind}, grid "
      f"{'x'.join(map(str, t.grid))}, {_gib(g.hbm_bytes)} GiB HBM each); mesh "
      + " ".join(f"{k}={v}" for k, v in r.mesh.items()),
      f"batch {r.rows} rows x {r.max_len} positions ({r.image_tokens} of them image); accum_steps "
      f"{r.accum_steps}; remat {r.remat}",
      f"{'step':8} {'fits':>4} {'compile s':>9} {'args GiB':>9} {'out GiB':>8} {'alias GiB':>9} {'temp GiB':>9} "
      f"{'code GiB':>8} {'peak GiB':>9} {'HBM GiB':>8}",
  ]
  for s in r.steps:
    if s.message:  # refused by the compiler: only its own total is known
      used = _gib(s.used) if s.used is not None else "?"
      lines.append(f"{s.name:8} {'NO':>4} {s.compile_s:9.1f} {'':>9} {'':>8} {'':>9} {'':>9} {'':>8} "
                   f"{used:>9} {_gib(s.hbm):>8}   compiler: {s.message}")
    else:
      lines.append(f"{s.name:8} {'yes' if s.fits else 'NO':>4} {s.compile_s:9.1f} {_gib(s.arguments):>9} "
                   f"{_gib(s.outputs):>8} {_gib(s.aliased):>9} {_gib(s.temporaries):>9} {_gib(s.code):>8} "
                   f"{_gib(s.peak):>9} {_gib(s.hbm):>8}")
  lines.append(f"train step: {r.train_flops:.4g} FLOPs (analytic, train/flops.py); at MFU {r.mfu:g}: "
               f"{r.step_time:.3f} s/step, {r.tokens_per_chip_s:,.0f} tokens/s/chip")
  lines.append("fits" if r.fits else "DOES NOT FIT")
  return "\n".join(lines)


def main(args) -> int:
  if not os.environ.get("JAX_PLATFORMS"):
    # Only the host runs anything; without this JAX would first try (and on a CPU host fail) to open a TPU.
    jax.config.update("jax_platforms", "cpu")
  config = cfg.load_config(args.config, args.overrides)
  steps = tuple(s for s in args.steps.split(",") if s)
  report = run(config, args.topology, num_slices=args.num_slices, steps=steps, mfu=args.mfu)
  print(format_report(report))
  return 0 if report.fits else NOT_FITTING


def add_compile_parser(subparsers) -> None:
  p = subparsers.add_parser(
      "compile", help="ahead-of-time compile the train and decode steps for a TPU topology (no TPU needed)",
      description="Compiles the steps of a config for a TPU slice on this host and reports per-chip memory, "
                  "compile time and the step time implied by an MFU. Exit code 3: does not fit in HBM.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--config", required=True, help="configs/<file>.py[:<preset>], then any --config.a.b=value")
  p.add_argument("--topology", required=True, help="TPU slice: v4-N, v5p-N (N TensorCores), v5e-N, v6e-N (N chips)")
  p.add_argument("--num-slices", type=int, default=1, help="slices joined over the data-centre network")
  p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
  p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the step time")
  p.set_defaults(func=main, overrides=True)
