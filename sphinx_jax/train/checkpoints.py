"""Training checkpoints: Orbax `CheckpointManager` over the train state, the data iterator and the config, with
the frozen params written once per run beside them.

WORKDIR/checkpoints/<step>/{state, data, config, frozen}: `state` is the TrainState pytree (step, skip counters,
optimizer state and the *trained* params) saved collectively by every process (async); `data` holds one JSON file
per process (`process_<i>-of-<n>.json`, Grain's own checkpoint handler) with that process's iterator state,
captured at save time; `config` the resolved config; `frozen` the list of param leaves the step leaves to
WORKDIR/frozen_params. Orbax writes each step into a temporary directory and renames it when complete, so a
checkpoint interrupted while writing is never chosen by `latest_step()`. Retention: the last `keep` plus every
`keep_period`-th step.

The frozen params (the towers in SPHINX's stages) never change during a run, so rewriting them at every step
costs time and storage for nothing (Orbax's save costs per leaf: half the demo's save went to the 156 frozen
tower leaves; at SPHINX-13B they are ~2.4 B parameters). A fresh run writes them to WORKDIR/frozen_params
synchronously before its first step, so every step checkpoint that names them finds them complete.
Steps saved before this layout (the whole params in `state`, no `frozen` item) still restore.

Restoring takes the abstract state with the *current* mesh's shardings, so a run saved on one mesh resumes on
another.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Collection

import grain
import jax
import orbax.checkpoint as ocp

from sphinx_jax.checkpoint import config_from_json, config_to_json, flatten, read_json, unflatten
from sphinx_jax.errors import SphinxError

FROZEN_DIR = "frozen_params"  # WORKDIR/frozen_params, beside WORKDIR/checkpoints
FROZEN_ITEM = "frozen"  # the item of each step naming the leaves kept there


def manager(workdir, *, keep: int = 3, keep_period: int | None = None, async_save: bool = True):
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period, create=True,
                                         enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options,
                               item_names=("state", "data", "config", FROZEN_ITEM))


class IteratorState:
  """The iterator-state object Grain's handler saves and restores: JSON bytes frozen at save time."""

  def __init__(self, state: dict | None = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes):
    self.state = json.loads(state.decode())

  def start_prefetch(self):  # part of the handler's protocol; the trainer's iterator prefetches itself
    pass


def split_params(params, frozen: Collection[str]) -> tuple[dict, dict]:
  """(params outside `frozen`, params in `frozen`): two nested dicts, `frozen` naming '/'-joined leaf paths."""
  flat = flatten(params)
  return (unflatten({p: v for p, v in flat.items() if p not in frozen}),
          unflatten({p: v for p, v in flat.items() if p in frozen}))


def frozen_dir(mgr) -> Path:
  # Outside the manager's directory: the manager deletes unfinished writes there in the background when it
  # starts, and would take this one's temporary directory with them.
  return Path(mgr.directory).parent / FROZEN_DIR


def save_frozen(mgr, params, frozen: Collection[str]) -> None:
  """Writes the `frozen` leaves of `params` to WORKDIR/frozen_params, replacing an earlier run's, collectively and
  before returning; Orbax renames the directory into place only once it is complete."""
  if jax.process_index() == 0:  # a write killed earlier left Orbax's temporary directory behind
    for stale in frozen_dir(mgr).parent.glob(f"{FROZEN_DIR}.orbax-checkpoint-tmp*"):
      shutil.rmtree(stale)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(frozen_dir(mgr), split_params(params, frozen)[1], force=True)
  checkpointer.wait_until_finished()


def save(mgr, step: int, state, data_state: dict, config, frozen: Collection[str] = (), *,
         force: bool = False) -> bool:
  """Saves `step`; its `frozen` params are left out (save_frozen wrote them at the start of the run)."""
  trained = state.replace(params=split_params(state.params, frozen)[0])
  return mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(trained),
                                                data=grain.checkpoint.CheckpointSave(IteratorState(data_state)),
                                                config=ocp.args.JsonSave(config_to_json(config)),
                                                **{FROZEN_ITEM: ocp.args.JsonSave({"leaves": sorted(frozen)})}),
                  force=force)


def step_dir(mgr, step: int) -> Path:
  return Path(mgr.directory) / str(step)


def stored_frozen(saved_step) -> list[str]:
  """The param leaves the step directory `saved_step` leaves to WORKDIR/frozen_params ([] for a step saved with
  all its params)."""
  listing = Path(saved_step) / FROZEN_ITEM / "metadata"
  return read_json(listing)["leaves"] if listing.is_file() else []


def restore(mgr, step: int, abstract_state, frozen: Collection[str] = ()):
  """(state placed by the shardings carried in `abstract_state`, this process's data state, config).

  `frozen`: the leaves the current config freezes; a step saved with another set is refused (the optimizer state
  would not fit either)."""
  stored = stored_frozen(step_dir(mgr, step))
  if stored and set(stored) != set(frozen):
    raise SphinxError(f"{step_dir(mgr, step)}: saved with {len(stored)} frozen param leaves, but this config "
                      f"freezes {len(frozen)} (config.train.trainable changed?); resume with the run's own config, "
                      "or start a new run from an export (train.init_from).")
  trained_target, frozen_target = split_params(abstract_state.params, stored)
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state.replace(params=trained_target)),
      data=grain.checkpoint.CheckpointRestore(IteratorState()),
      config=ocp.args.JsonRestore()))
  state = restored["state"]
  if stored:
    state = state.replace(params=unflatten({**flatten(state.params),
                                            **flatten(restore_frozen(mgr, frozen_target))}))
  return state, restored["data"].state, config_from_json(restored["config"])


def restore_frozen(mgr, abstract_frozen):
  if not frozen_dir(mgr).is_dir():
    raise SphinxError(f"{frozen_dir(mgr)}: missing; the saved steps hold only the trained params and the frozen "
                      "ones (the towers) were kept there. Restore that directory, or start a new run.")
  return ocp.StandardCheckpointer().restore(frozen_dir(mgr), abstract_frozen)
