"""Cloud TPU launcher: create a TPU VM slice (or several, as a multi-slice queued resource), install the pinned
requirements on every worker, run the same `sphinx-jax train` on all workers, stream logs, stop, delete.

  python launch/tpu.py --name sphinx --zone us-east5-a --project my-proj --tpu v5p-128 create
  python launch/tpu.py ... install
  python launch/tpu.py ... mount --bucket bucket        # gs://bucket at /gcs/bucket on every worker (gcsfuse)
  python launch/tpu.py ... run -- --config configs/sphinx.py:sphinx_1k --workdir /gcs/bucket/run1
  python launch/tpu.py ... logs | stop | delete
Every subcommand takes --dry-run, which prints the exact gcloud commands instead of running them.

Single slices use `gcloud compute tpus tpu-vm` unless --queued; multi-slice (--num-slices > 1) always goes
through queued resources (`--node-count/--node-prefix`), whose nodes are named <name>-0, <name>-1, ... and get
the MEGASCALE_* environment from the service, so the same command on every worker of every slice forms one JAX
job; jax.distributed initialises itself on TPU VMs (sphinx_jax/train/cli.py). Mesh `data` spans slices.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.commands import execute  # noqa: E402

# gcloud accelerator-type prefix and TPU VM runtime image per generation.
GENERATIONS = {
    "v4": ("v4", "tpu-ubuntu2204-base"),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite"),
    "v5p": ("v5p", "v2-alpha-tpuv5"),
    "v6e": ("v6e", "v2-alpha-tpuv6e"),
}
REMOTE_DIR = "~/sphinx_jax"
LOG = "~/sphinx_jax_train.log"


def accelerator_type(tpu: str) -> tuple[str, str]:
  """'v5e-256' -> ('v5litepod-256', 'v2-alpha-tpuv5-lite')."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", tpu)
  if not m:
    raise SystemExit(f"launch: --tpu {tpu!r}: use <generation>-<size> with generation in {sorted(GENERATIONS)}, "
                     f"e.g. v5p-128 or v5e-256.")
  prefix, runtime = GENERATIONS[m.group(1)]
  return f"{prefix}-{m.group(2)}", runtime


def nodes(args) -> list[str]:
  return [f"{args.name}-{i}" for i in range(args.num_slices)] if queued(args) and args.num_slices > 1 else [args.name]


def queued(args) -> bool:
  return args.queued or args.num_slices > 1


def where(args) -> list[str]:
  return [f"--zone={args.zone}", f"--project={args.project}"]


def create(args) -> list[list[str]]:
  accel, runtime = accelerator_type(args.tpu)
  runtime = args.runtime or runtime
  extra = ["--spot"] if args.spot else []
  if not queued(args):
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *where(args),
             f"--accelerator-type={accel}", f"--version={runtime}", *extra]]
  placement = ([f"--node-count={args.num_slices}", f"--node-prefix={args.name}"] if args.num_slices > 1
               else [f"--node-id={args.name}"])
  return [["gcloud", "compute", "tpus", "queued-resources", "create", args.name, *where(args),
           f"--accelerator-type={accel}", f"--runtime-version={runtime}", *placement, *extra]]


def on_all_workers(args, command: str) -> list[list[str]]:
  return [["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *where(args), "--worker=all", f"--command={command}"]
          for node in nodes(args)]


def install(args) -> list[list[str]]:
  """Ships `git archive HEAD` of this checkout to every worker and installs the pinned requirements + libtpu."""
  tarball = "/tmp/sphinx_jax.tar.gz"
  commands = [["git", "-C", str(Path(__file__).resolve().parent.parent), "archive", "--format=tar.gz",
               f"--output={tarball}", "HEAD"]]
  commands += [["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{node}:/tmp/", *where(args), "--worker=all"]
               for node in nodes(args)]
  setup = (f"mkdir -p {REMOTE_DIR} && tar -xzf {tarball} -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
           "python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2' && "
           ".venv/bin/pip install -q --no-deps -e .")
  return commands + on_all_workers(args, setup)


GCSFUSE_APT = "https://packages.cloud.google.com/apt"
GCSFUSE_KEY = "/usr/share/keyrings/cloud.google.asc"
# Orbax commits a checkpoint by renaming its directory; on a flat bucket gcsfuse renames only directories of up
# to this many objects (one copy each, not atomic); hierarchical-namespace buckets rename atomically.
RENAME_DIR_LIMIT = 100_000


def mount(args) -> list[list[str]]:
  """Mounts gs://BUCKET at the same path on every worker with Cloud Storage FUSE (installed from Google's apt
  repository when missing): the shared WORKDIR the trainer needs (sphinx_jax/train/workdir.py)."""
  at = args.mount_point or f"/gcs/{args.bucket}"
  install_gcsfuse = (
      f'echo "deb [signed-by={GCSFUSE_KEY}] {GCSFUSE_APT} gcsfuse-$(lsb_release -c -s) main" | '
      "sudo tee /etc/apt/sources.list.d/gcsfuse.list > /dev/null && "
      f"curl -fsSL {GCSFUSE_APT}/doc/apt-key.gpg | sudo tee {GCSFUSE_KEY} > /dev/null && "
      "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse")
  gcsfuse = f"gcsfuse --implicit-dirs --rename-dir-limit={RENAME_DIR_LIMIT} {args.bucket} {at}"
  command = (f"(command -v gcsfuse > /dev/null || ({install_gcsfuse})) && sudo mkdir -p {at} && "
             f'sudo chown "$USER" {at} && (mountpoint -q {at} || {gcsfuse})')
  return on_all_workers(args, command)


def run(args) -> list[list[str]]:
  train = " ".join(["sphinx-jax", "train", *args.train_args])
  command = f"cd {REMOTE_DIR} && nohup .venv/bin/{train} > {LOG} 2>&1 &"
  return on_all_workers(args, command)


def logs(args) -> list[list[str]]:
  return [["gcloud", "compute", "tpus", "tpu-vm", "ssh", nodes(args)[0], *where(args), "--worker=0",
           f"--command=tail -n 200 -f {LOG}"]]


def stop(args) -> list[list[str]]:
  return on_all_workers(args, "pkill -f 'sphinx-jax train' || true")


def delete(args) -> list[list[str]]:
  if queued(args):
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *where(args), "--force",
             "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *where(args), "--quiet"]]


ACTIONS = {"create": create, "install": install, "mount": mount, "run": run, "logs": logs, "stop": stop,
           "delete": delete}


def parse(argv):
  argv = list(argv)
  train_args = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("action", choices=sorted(ACTIONS))
  p.add_argument("--name", required=True)
  p.add_argument("--zone", required=True)
  p.add_argument("--project", required=True)
  p.add_argument("--tpu", required=True, help="e.g. v5p-128, v5e-256, v4-64, v6e-256")
  p.add_argument("--num-slices", type=int, default=1)
  p.add_argument("--queued", action="store_true", help="single slice through queued resources")
  p.add_argument("--spot", action="store_true")
  p.add_argument("--runtime", default=None, help="TPU VM runtime image (default per generation)")
  p.add_argument("--bucket", default=None, help="mount: the Cloud Storage bucket (name, no gs://)")
  p.add_argument("--mount-point", default=None, help="mount: where on every worker (default /gcs/BUCKET)")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args = p.parse_args(argv)
  args.train_args = train_args
  if args.action == "run" and not train_args:
    p.error("run: give the training arguments after --, e.g. -- --config configs/sphinx.py:sphinx_1k --workdir DIR")
  if args.action == "mount" and not args.bucket:
    p.error("mount: give --bucket NAME")
  if args.action == "run" and (url := next((a for a in train_args if a.startswith("gs://")), None)):
    p.error(f"run: {url}: the trainer writes to a directory every worker sees; mount the bucket first "
            "(`mount --bucket NAME`) and pass /gcs/NAME/... instead")
  return args


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  return execute(ACTIONS[args.action](args), args.dry_run)


if __name__ == "__main__":
  raise SystemExit(main())
