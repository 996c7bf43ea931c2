"""`sphinx-jax train`: the main job. Builds the mesh, the sharded state and the data mixture, runs the jitted
step, logs (tqdm, TensorBoard, WORKDIR/metrics.jsonl), evaluates, checkpoints and resumes.

Mirrors the stage-2 fine-tuning of LLaMA2-Accessory (`main_finetune.py` + `engine_finetune.py`): frozen towers,
trainable LLM + fusion (per `train.trainable`), AdamW with the original's decay rule, warm-up + cosine.
Resume: the latest complete checkpoint under WORKDIR/checkpoints is restored (state and data iterator), so the
same command continues a killed run. Preemption: SIGTERM (a preempted or spot TPU VM, `scancel`, `kill`) saves a
checkpoint at the next step boundary and stops cleanly (data workers included); multi-process runs agree on that
step through JAX's coordination service. Only process 0 writes logs; checkpoints are written by all processes.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from sphinx_jax import config as cfg
from sphinx_jax import host_memory
from sphinx_jax import sharding as sh
from sphinx_jax.checkpoint import flatten
from sphinx_jax.handle import MODEL_PARTS
from sphinx_jax.inference.generate import CPU_COMPILER_OPTIONS
from sphinx_jax.data import pipeline
from sphinx_jax.data.tokenizer import Tokenizer
from sphinx_jax.errors import SphinxError
from sphinx_jax.models import moe as moe_lib
from sphinx_jax.models.sphinx import Sphinx
from sphinx_jax.train import checkpoints, flops as flops_lib
from sphinx_jax.train import export as export_lib
from sphinx_jax.train import optimizer as opt_lib
from sphinx_jax.train import profile as profile_lib
from sphinx_jax.train import state as state_lib
from sphinx_jax.train import step as step_lib
from sphinx_jax.train import workdir as workdir_lib
from sphinx_jax.train.stored import stored_params
from sphinx_jax.train.evaluation import Evaluator

BATCH_AXES = ("data", "fsdp")


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step or evaluation) + TensorBoard events; process 0 only."""

  def __init__(self, workdir: Path, enabled: bool):
    self.enabled = enabled
    self._file = open(workdir / "metrics.jsonl", "a") if enabled else None
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in values.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, float(v), int(step))

  def image(self, tag: str, step: int, hwc_uint8):
    if self.enabled:
      self._tb.add_image(tag, hwc_uint8, int(step), dataformats="HWC")

  def close(self):
    if self.enabled:
      self._file.close()
      self._tb.close()


def init_inputs(model_config, batch: int = 1):
  """Shapes of the smallest inputs that build every parameter: [BOS, 1 token], one uint8 image and has_image when
  the model has towers (a text-only model takes no image). Abstract, for `lazy_init`."""
  tokens = jax.ShapeDtypeStruct((batch, 2), jnp.int32)
  if not model_config.towers:
    return (tokens,)
  s = model_config.image_size
  return tokens, jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8), jax.ShapeDtypeStruct((batch,), bool)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def to_global(batch: dict, sharding) -> dict:
  """Per-process numpy batch -> global jax Arrays sharded over the batch axes (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def apply_fn(model: Sphinx):
  """(params, batch) -> (final-norm hidden states aligned with batch["tokens"], weighted auxiliary loss).

  Text batches (no "images": text-only groups, or a model without towers) run the decoder alone; the batch's keys
  are static, so each kind compiles once. A MoE decoder sows its per-layer load-balancing losses; their mean
  times `moe.load_balancing_weight` is the auxiliary loss (the original's rule).
  """
  with_towers = bool(model.config.towers)
  moe_config = model.config.llm.get("moe")

  def apply(params, batch):
    args = (batch["tokens"],) if not with_towers or "images" not in batch else (
        batch["tokens"], batch["images"], batch["has_image"])
    if not moe_config:
      return model.apply({"params": params}, *args, return_hidden=True), jnp.float32(0.0)
    hidden, sown = model.apply({"params": params}, *args, return_hidden=True, mutable=["aux_loss"])
    return hidden, moe_config.load_balancing_weight * moe_lib.load_balancing_loss(sown["aux_loss"])
  return apply


PARTS_FROM = {"towers": "towers_from", "llm": "llm_from"}  # model part -> the train key naming its directory


def initial_params(config, boxed_init, shardings):
  """Fresh params, or `train.init_from` (a model directory from convert/mix/train), placed on the mesh; then the
  parts named by `train.towers_from` / `train.llm_from` when set. Directories of either layer layout (scanned or
  not) fit (train/stored.py)."""
  init_from = config.train.get("init_from")
  parts_from = {part: config.train.get(key) for part, key in PARTS_FROM.items() if config.train.get(key)}
  expected = flatten(sh.strip_boxes(jax.eval_shape(boxed_init))) if init_from or parts_from else {}
  # SPHINX always starts from a pretrained LLM and pretrained encoders: these come from their own directories
  # while the rest comes from a fresh init or `init_from` (the demo: configs/assets/make_demo_towers.py, demo.py:llm).
  # Read first, so that a directory that does not fit fails before the (large) fresh init.
  flat_shardings = flatten(shardings)
  replaced = {}
  for part, path in parts_from.items():
    part_shardings = {p: s for p, s in flat_shardings.items() if p.startswith(f"{part}/")}
    replaced[part] = stored_params(PARTS_FROM[part], path, expected, part_shardings, (part,))[part]
  if init_from:
    # Only the model's parts are trained; side trees of the converters (`extras`: leaves the original carries but
    # never uses) stay in the source directory.
    params = stored_params("init_from", init_from, expected, flat_shardings, MODEL_PARTS)
  else:
    params = jax.jit(lambda: nn.meta.unbox(boxed_init()), out_shardings=shardings)()
  return {**params, **replaced}


class Program(NamedTuple):
  """Everything about a training job that needs no data and no device memory: the model, the optimizer, the
  abstract state with its shardings and the jitted step. `sphinx-jax compile` lowers `step` for a TPU topology
  from these; `train` materialises the state and feeds batches."""
  model: Sphinx
  boxed_init: Callable
  tx: Any
  schedule: Callable
  abstract_state: Any
  state_shardings: Any
  batch_sharding: NamedSharding
  step: Callable

  def placed_state(self):
    """The abstract state as ShapeDtypeStructs carrying their shardings (what restore and `.lower` take)."""
    return sh.placed_abstract(self.abstract_state, self.state_shardings)


def step_compiler_options(train, mesh) -> dict | None:
  """The step's XLA options: with `train.cpu_library_fusions` off and the mesh on CPU devices, XLA's own dot
  emitter instead of YNNPACK's fusions (generate.CPU_COMPILER_OPTIONS); else none (a TPU topology's compile too)."""
  if train.get("cpu_library_fusions", True) or mesh.devices.flat[0].platform != "cpu":
    return None
  return dict(CPU_COMPILER_OPTIONS)


def build(config, mesh, rules) -> Program:
  """The jitted train step and abstract state of `config` on `mesh` (call under jax.set_mesh + axis rules)."""
  model = Sphinx(config.model)

  def boxed_init():
    # The key is made inside the traced function: an eager op has no device to run on under the topology
    # mesh of `sphinx-jax compile`.
    # lazy_init computes only the initialisers, not the forward pass on dummy inputs (whose compile dominated).
    # Only params are made: sown values (the MoE balancing loss) depend on real inputs, which lazy_init lacks.
    return model.lazy_init(jax.random.key(config.seed), *init_inputs(config.model), mutable=["params"])["params"]

  abstract_params = sh.strip_boxes(jax.eval_shape(boxed_init))
  tx, schedule = opt_lib.make_optimizer(abstract_params, config.train)
  abstract_state, state_shardings = state_lib.state_shardings(boxed_init, tx, mesh, rules)
  in_batch = batch_sharding(mesh)
  step_fn = step_lib.make_train_step(apply_fn(model), tx, schedule)
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, in_batch), out_shardings=(state_shardings, None),
                   donate_argnums=(0,), compiler_options=step_compiler_options(config.train, mesh))
  return Program(model, boxed_init, tx, schedule, abstract_state, state_shardings, in_batch, jitted)


def train(config, workdir, *, stop_after: int | None = None) -> dict:
  """Runs (or resumes) the job of `config` in `workdir`; returns the summary printed at the end.

  stop_after: return after this many steps of this invocation (tests use it to simulate preemption).
  """
  cfg.validate(config, num_devices=jax.device_count(), training=True)
  workdir = workdir_lib.local_workdir(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.check_shared(workdir)
  lead = jax.process_index() == 0
  mesh = sh.make_mesh(config.mesh)
  rules = sh.rules_from_config(config)
  tokenizer = Tokenizer.from_file(config.data.tokenizer)
  if tokenizer.n_words != config.model.llm.vocab_size:
    raise SphinxError(f"config.model.llm.vocab_size={config.model.llm.vocab_size} but {config.data.tokenizer} "
                      f"has {tokenizer.n_words} pieces; set the vocab size to the tokenizer's.")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    program = build(config, mesh, rules)
    manager = checkpoints.manager(workdir, keep=config.train.keep_checkpoints,
                                  keep_period=config.train.get("keep_period") or None)
    frozen = opt_lib.frozen_leaves(program.abstract_state.params, config.train.trainable)
    state, data_state = start_state(config, program, manager, frozen)
    data = pipeline.make_iterator(config.data, tokenizer, image_size=config.model.image_size,
                                  image_words=cfg.image_tokens(config.model))
    if data_state is not None:
      data.set_state(data_state)
    summary = _run(config, workdir, lead, program.model, tokenizer, manager, frozen, data, state, program.step,
                   program.batch_sharding, stop_after)
  if config.train.get("export_to") and summary["last_step"] == config.train.num_steps:
    if lead:  # one set of files, put in place by a rename: one writer
      summary["export"] = str(export_lib.export(workdir, config.train.export_to, overwrite=True))
    if jax.process_count() > 1:  # the others wait here, not in jax.distributed's shutdown barrier, which times out
      multihost_utils.sync_global_devices("export written")
  return summary


def start_state(config, program: Program, manager, frozen) -> tuple[Any, dict | None]:
  """(train state, data iterator state or None): the latest complete checkpoint's, or a fresh state. The `frozen`
  params are written to WORKDIR/frozen_params (checkpoints.save_frozen) before any step of this run is saved: at a
  fresh start, and after a step saved with all its params (before that directory existed)."""
  if (last_saved := manager.latest_step()) is None:
    params = initial_params(config, program.boxed_init, program.state_shardings.params)
    state = jax.jit(lambda p: state_lib.create(p, program.tx), out_shardings=program.state_shardings)(params)
    data_state, write_frozen = None, True
  else:
    state, data_state, _ = checkpoints.restore(manager, last_saved, program.placed_state(), frozen)
    write_frozen = not checkpoints.stored_frozen(checkpoints.step_dir(manager, last_saved))
  if frozen and write_frozen:
    checkpoints.save_frozen(manager, state.params, frozen)
  return state, data_state


class Preemption:
  """Turns SIGTERM into a request to checkpoint and stop at the next step boundary.

  One process: a Python handler sets a flag (installed from the main thread only; the previous handler comes back
  on exit). Several processes: JAX's preemption sync manager owns SIGTERM and picks a step every process reaches
  (`CheckpointManager.reached_preemption`), so no handler is installed here.
  """

  def __init__(self):
    self.requested, self._previous = False, None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._request)
    return self

  def _request(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:  # None also when no handler was installed
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, manager, step: int) -> bool:
    return manager.reached_preemption(step) if jax.process_count() > 1 else self.requested


def _run(config, workdir, lead, model, tokenizer, manager, frozen, data, state, jitted, in_batch, stop_after):
  from tqdm import tqdm

  t = config.train
  log = MetricsLog(workdir, lead)
  first = int(jax.device_get(state.step))
  last = t.num_steps if stop_after is None else min(t.num_steps, first + stop_after)
  pending, window_start, window_tokens, window_images = [], time.perf_counter(), 0, 0
  peak = t.get("peak_flops") or 0.0
  # the allocator matters to the step time on CPU (host_memory); recorded so that runs compare like with like
  summary = {"first_step": first, "eval": {}, "host_allocator": host_memory.loaded_allocator()}
  evaluator = Evaluator(config, model, tokenizer) if t.eval_every else None
  traced = profile_lib.StepWindow(workdir / "tensorboard", t.get("profile_at", 0), t.get("profile_steps", 1))

  def evaluate(done):
    scores = evaluator.run(state.params, workdir / "predictions" / f"step_{done}", log if lead else None, done)
    log.write(done, {f"eval/{k}": v for k, v in scores.items()})
    summary["eval"][done] = scores

  if evaluator and first == 0 and t.get("eval_at_start"):
    evaluate(0)  # the untrained model's scores: the baseline the later evaluations are read against
  bar = tqdm(range(first, last), initial=first, total=t.num_steps, disable=not lead, desc="train",
             dynamic_ncols=True)
  with Preemption() as preemption:
    try:
      for step in bar:
        batch = next(data)
        window_tokens += int(batch["tokens"].size)
        window_images += int(np.sum(batch.get("has_image", 0)))
        done = step + 1
        traced.before(done, state)
        placed = to_global(batch, in_batch)
        state, metrics = jitted(state, placed)
        pending.append(metrics)
        if profiled := traced.after(done, state, lambda: jitted.lower(state, placed).compile().as_text()):
          summary["profile"] = str(profiled)
          bar.write(f"train: steps {traced.start}-{done} profiled; where their time went: {profiled}")
        preempted = preemption.reached(manager, done)  # every step: processes agree on the step through it
        if done % t.log_every == 0 or done == last or preempted:
          values = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
          elapsed = time.perf_counter() - window_start
          values.update(steps_per_s=len(pending) / elapsed, tokens_per_s=window_tokens / elapsed,
                        images_per_s=window_images / elapsed)
          if peak:
            rows, length = batch["tokens"].shape
            per_step = flops_lib.step_flops(config.model, rows * jax.process_count(),
                                            length + cfg.image_tokens(config.model))
            values["mfu"] = per_step * values["steps_per_s"] / (peak * jax.device_count())
          values.update({f"data/bad/{k}": v for k, v in data.bad.items()})
          log.write(done, values)
          bar.set_postfix(loss=f"{values['loss']:.3f}", acc=f"{values['accuracy']:.2f}")
          summary["loss"] = values["loss"]
          pending, window_start, window_tokens, window_images = [], time.perf_counter(), 0, 0
          if int(jax.device_get(state.nonfinite_in_row)) > t.max_nonfinite_in_row:
            raise SphinxError(f"train: {int(state.nonfinite_in_row)} non-finite updates in a row at step {done} "
                              f"(limit train.max_nonfinite_in_row={t.max_nonfinite_in_row}); lower train.lr or "
                              f"check the data.")
        if t.eval_every and (done % t.eval_every == 0 or done == t.num_steps):
          evaluate(done)
        if done % t.checkpoint_every == 0 or done == t.num_steps or preempted:
          checkpoints.save(manager, done, state, data.get_state(), config, frozen)
        if preempted:
          last = summary["preempted_at"] = done
          bar.write(f"train: preempted at step {done}; checkpoint saved, run the same command to resume.")
          break
    finally:
      traced.close()
      manager.wait_until_finished()
      data.close()
      log.close()
  summary.update(last_step=last, workdir=str(workdir), predictions=str(workdir / "predictions"),
                 skipped_updates=int(jax.device_get(state.nonfinite_total)), bad_records=dict(data.bad))
  if lead:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
  return summary
