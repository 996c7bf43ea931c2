"""`sphinx-jax train --config configs/<file>.py[:<preset>] [--config.a.b=v ...] --workdir DIR`.

Multi-host: on Cloud TPU VMs `jax.distributed.initialize()` finds its peers by itself (`--distributed auto`,
the default when a TPU is present); elsewhere pass --coordinator_address, --num_processes and --process_id
(every process runs the same command).
Exit status: 0 when the run reached train.num_steps (or --stop_after); 143 (128 + SIGTERM) when it was preempted
and saved a checkpoint, so that job supervisors (GKE, Slurm, a shell loop) restart it and it resumes.
"""
from __future__ import annotations

import argparse

PREEMPTED_EXIT = 143


def add_train_parser(subparsers):
  p = subparsers.add_parser("train", help="train or fine-tune SPHINX (resumes from WORKDIR if present)")
  p.add_argument("--config", required=True, help="configs/<file>.py[:<preset>]")
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard, predictions")
  p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (multi-process runs)")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.add_argument("--stop_after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate preemption
  p.set_defaults(func=run, overrides=True)


def init_distributed(args):
  """jax.distributed from flags, or automatically on a multi-host Cloud TPU slice."""
  import os

  import jax
  if args.coordinator_address:
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def run(args) -> int:
  from sphinx_jax.config import load_config
  from sphinx_jax.train.loop import train

  init_distributed(args)
  config = load_config(args.config, args.overrides)
  summary = train(config, args.workdir, stop_after=args.stop_after)
  import jax
  if jax.process_index() == 0:
    print(summary_text(summary))
  return PREEMPTED_EXIT if "preempted_at" in summary else 0


def summary_text(summary: dict) -> str:
  """The end-of-run report: steps, last loss, one row per evaluation metric with a column per evaluated step,
  and where the drawn predictions, the profiled steps' summary and summary.json are."""
  lines = [f"trained to step {summary['last_step']}" + (f" (preempted at {summary['preempted_at']})"
                                                        if "preempted_at" in summary else "")
           + (f", last logged loss {summary['loss']:.3f}" if "loss" in summary else "")]
  evals = summary.get("eval") or {}
  if evals:
    steps = sorted(evals)
    names = sorted({name for scores in evals.values() for name in scores})
    width = max(len(n) for n in names) + 2
    lines.append("held-out evaluation".ljust(width) + "".join(f"step {s}".rjust(10) for s in steps))
    for name in names:
      lines.append(name.ljust(width) + "".join(
          (f"{evals[s][name]:.3f}" if name in evals[s] else "-").rjust(10) for s in steps))
  if evals:
    lines.append(f"predictions drawn in {summary['predictions']} (and TensorBoard)")
  if "profile" in summary:
    lines.append(f"profiled steps: {summary['profile']} (the trace beside it)")
  lines.append(f"summary: {summary['workdir']}/summary.json")
  return "\n".join(lines)
