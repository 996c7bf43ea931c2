"""A training checkpoint -> a model directory (checkpoint.py) that `mix`, `load`, `generate` and
`train --config.train.init_from` accept. LLaMA2-Accessory has no counterpart: its fine-tuning saves
consolidated weights that are already the released format.

Reads WORKDIR/checkpoints/<step>/state (the TrainState pytree) and .../config (the resolved config); only the
`params/...` leaves are taken (optimizer state, step and counters are left behind), streamed one stored chunk
at a time, so exporting needs no more memory than mixing. The frozen params the step names come from
WORKDIR/frozen_params (train/checkpoints.py). The tokenizer named by `config.data.tokenizer` is
copied in when it exists. A run started from `train.init_from` trains only the model's parts (handle.MODEL_PARTS);
the side trees of that directory (`extras/…`: leaves LLaMA2-Accessory stores but never uses) are copied over
unchanged, so the export converts back to the accessory format like the directory it started from.
"""
from __future__ import annotations

from pathlib import Path

from sphinx_jax import checkpoint
from sphinx_jax.errors import SphinxError
from sphinx_jax.handle import MODEL_PARTS
from sphinx_jax.train import checkpoints

PARAMS_PREFIX = "params/"


def saved_steps(workdir) -> list[int]:
  root = Path(workdir) / "checkpoints"
  if not root.is_dir():
    raise SphinxError(f"{root}: no training checkpoints; train first, or give the --workdir of a training run.")
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def _copy_leaf(store):
  return lambda region: store[region].read().result()


def _streamed(params_dir, shapes, prefix=""):
  return {p: checkpoint.StreamedLeaf(tuple(s.shape), s.dtype,
                                     _copy_leaf(checkpoint.open_leaf(params_dir, prefix + p)))
          for p, s in shapes.items()}


def side_leaves(config) -> dict:
  """{path: StreamedLeaf} of the `train.init_from` directory's leaves outside the model's parts ({} without one)."""
  init_from = config.get("train", {}).get("init_from")
  if not init_from:
    return {}
  if not Path(init_from).is_dir():
    raise SphinxError(f"config.train.init_from={init_from}: the directory the run started from is gone; its side "
                      "trees (extras/…) are needed in the export: restore it, or pass --no-side-trees.")
  shapes = {p: s for p, s in checkpoint.abstract_params(init_from).items() if p.split("/")[0] not in MODEL_PARTS}
  return _streamed(Path(init_from).absolute() / checkpoint.PARAMS_DIR, shapes)


def frozen_leaves(saved) -> dict:
  """{path: StreamedLeaf} of the frozen params the step directory `saved` left to WORKDIR/frozen_params."""
  names = checkpoints.stored_frozen(saved)
  if not names:
    return {}
  frozen = saved.parent.parent / checkpoints.FROZEN_DIR
  shapes = checkpoint.orbax_shapes(frozen) if frozen.is_dir() else {}
  if missing := [p for p in names if p not in shapes]:
    problem = f"no leaf {missing[0]!r}" if shapes else "missing"
    raise SphinxError(f"{frozen}: {problem}; step {saved.name} keeps its frozen params (the towers) there. "
                      "Restore that directory from the run.")
  return _streamed(frozen, {p: shapes[p] for p in names})


def export(workdir, out, step: int | None = None, overwrite: bool = False, side_trees: bool = True) -> Path:
  """Writes the params of training step `step` (default: the latest) of `workdir` as a model directory, plus
  the side trees of `train.init_from` unless `side_trees` is False."""
  steps = saved_steps(workdir)
  if not steps or (step is not None and step not in steps):
    raise SphinxError(f"{workdir}: no checkpoint of step {step if step is not None else '(any)'}; saved steps: "
                      f"{steps}.")
  step = steps[-1] if step is None else step
  saved = Path(workdir).absolute() / "checkpoints" / str(step)
  config = checkpoint.config_from_json(checkpoint.read_json(saved / "config" / "metadata"))
  shapes = {p[len(PARAMS_PREFIX):]: s for p, s in checkpoint.orbax_shapes(saved / "state").items()
            if p.startswith(PARAMS_PREFIX)}
  checkpoint.check_destination(out, overwrite)
  side = side_leaves(config) if side_trees else {}
  leaves = {**side, **_streamed(saved / "state", shapes, PARAMS_PREFIX), **frozen_leaves(saved)}
  tokenizer = config.get("data", {}).get("tokenizer") or None
  tokenizer = tokenizer if tokenizer and Path(tokenizer).is_file() else None
  return checkpoint.save_streamed_model_dir(out, leaves, config, tokenizer, overwrite=overwrite,
                                            metadata={"source": str(saved), "kind": "train", "step": step,
                                                      "side_trees_from": config.train.init_from if side else None})


def add_export_parser(subparsers):
  p = subparsers.add_parser("export", help="write a training run's params as a model directory")
  p.add_argument("--workdir", required=True, help="the training run's --workdir")
  p.add_argument("--out", required=True, help="destination model directory")
  p.add_argument("--step", type=int, default=None, help="saved step to export (default: the latest)")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--no-side-trees", dest="side_trees", action="store_false",
                 help="leave out the init_from directory's extras/… (the export then cannot go back to accessory)")
  p.set_defaults(func=lambda args: print(export(args.workdir, args.out, args.step, args.overwrite,
                                                args.side_trees)) or 0)
