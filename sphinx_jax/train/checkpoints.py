"""Training checkpoints: Orbax `CheckpointManager` over the train state, the data iterator and the config.

WORKDIR/checkpoints/<step>/{state, data, config}: `state` is the TrainState pytree (params, optimizer state,
step, skip counters) saved collectively by every process (async); `data` holds one JSON file per process
(`process_<i>-of-<n>.json`, Grain's own checkpoint handler) with that process's iterator state, captured at
save time; `config` the resolved config. Orbax writes each step into a
temporary directory and renames it when complete, so a checkpoint interrupted while writing is never chosen by
`latest_step()`. Retention: the last `keep` plus every `keep_period`-th step.
Restoring takes the abstract state with the *current* mesh's shardings, so a run saved on one mesh resumes on
another.
"""
from __future__ import annotations

import json
from pathlib import Path

import grain
import orbax.checkpoint as ocp

from sphinx_jax.checkpoint import config_from_json, config_to_json


def manager(workdir, *, keep: int = 3, keep_period: int | None = None, async_save: bool = True):
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period, create=True,
                                         enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options,
                               item_names=("state", "data", "config"))


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


def save(mgr, step: int, state, data_state: dict, config, *, force: bool = False) -> bool:
  return mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=grain.checkpoint.CheckpointSave(IteratorState(data_state)),
                                                config=ocp.args.JsonSave(config_to_json(config))),
                  force=force)


def restore(mgr, step: int, abstract_state):
  """(state placed by the shardings carried in `abstract_state`, this process's data state, config)."""
  restored = mgr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(IteratorState()),
      config=ocp.args.JsonRestore()))
  return restored["state"], restored["data"].state, config_from_json(restored["config"])
