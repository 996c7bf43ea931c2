"""GPU-cluster launcher (Slurm): one process per node, all GPUs of a node in it, JAX's distributed runtime
initialised from the Slurm environment through `sphinx-jax train`'s flags.

  python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition a100 [--dry-run] -- --config ... --workdir DIR
--dry-run prints the batch script and the sbatch command instead of submitting.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.commands import execute, render  # noqa: E402

PORT = 12355


def batch_script(args) -> str:
  train = render(["sphinx-jax", "train", *args.train_args])
  return "\n".join([
      "#!/bin/bash",
      f"#SBATCH --job-name={args.job_name}",
      f"#SBATCH --nodes={args.nodes}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --gpus-per-node={args.gpus_per_node}",
      f"#SBATCH --partition={args.partition}",
      f"#SBATCH --time={args.time}",
      "#SBATCH --output=%x-%j.log",
      "set -euo pipefail",
      'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
      f'srun bash -c "cd {args.repo} && .venv/bin/{train} '
      f'--coordinator_address=$head:{PORT} --num_processes=\\$SLURM_NTASKS --process_id=\\$SLURM_PROCID"',
      "",
  ])


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  train_args = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus-per-node", type=int, default=8)
  p.add_argument("--partition", required=True)
  p.add_argument("--time", default="24:00:00")
  p.add_argument("--job-name", default="sphinx_jax")
  p.add_argument("--repo", default=str(Path(__file__).resolve().parent.parent), help="checkout on the nodes")
  p.add_argument("--dry-run", action="store_true")
  args = p.parse_args(argv)
  if not train_args:
    p.error("give the training arguments after --")
  args.train_args = train_args
  script = batch_script(args)
  if args.dry_run:
    print(script)
    return execute([["sbatch", "<batch script above>"]], dry_run=True)
  with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
    f.write(script)
  return execute([["sbatch", f.name]], dry_run=False)


if __name__ == "__main__":
  raise SystemExit(main())
