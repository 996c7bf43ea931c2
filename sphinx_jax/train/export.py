"""A training checkpoint -> a model directory (checkpoint.py) that `mix`, `load`, `generate` and
`train --config.train.init_from` accept. LLaMA2-Accessory has no counterpart: its fine-tuning saves
consolidated weights that are already the released format.

Reads WORKDIR/checkpoints/<step>/state (the TrainState pytree) and .../config (the resolved config); only the
`params/...` leaves are taken (optimizer state, step and counters are left behind), streamed one stored chunk
at a time, so exporting needs no more memory than mixing. The tokenizer named by `config.data.tokenizer` is
copied in when it exists.
"""
from __future__ import annotations

from pathlib import Path

from sphinx_jax import checkpoint
from sphinx_jax.errors import SphinxError

PARAMS_PREFIX = "params/"


def saved_steps(workdir) -> list[int]:
  root = Path(workdir) / "checkpoints"
  if not root.is_dir():
    raise SphinxError(f"{root}: no training checkpoints; train first, or give the --workdir of a training run.")
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def _copy_leaf(store):
  return lambda region: store[region].read().result()


def export(workdir, out, step: int | None = None, overwrite: bool = False) -> Path:
  """Writes the params of training step `step` (default: the latest) of `workdir` as a model directory."""
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
  leaves = {p: checkpoint.StreamedLeaf(tuple(s.shape), s.dtype,
                                       _copy_leaf(checkpoint.open_leaf(saved / "state", PARAMS_PREFIX + p)))
            for p, s in shapes.items()}
  tokenizer = config.get("data", {}).get("tokenizer") or None
  tokenizer = tokenizer if tokenizer and Path(tokenizer).is_file() else None
  return checkpoint.save_streamed_model_dir(out, leaves, config, tokenizer, overwrite=overwrite,
                                            metadata={"source": str(saved), "kind": "train", "step": step})


def add_export_parser(subparsers):
  p = subparsers.add_parser("export", help="write a training run's params as a model directory")
  p.add_argument("--workdir", required=True, help="the training run's --workdir")
  p.add_argument("--out", required=True, help="destination model directory")
  p.add_argument("--step", type=int, default=None, help="saved step to export (default: the latest)")
  p.add_argument("--overwrite", action="store_true")
  p.set_defaults(func=lambda args: print(export(args.workdir, args.out, args.step, args.overwrite)) or 0)
