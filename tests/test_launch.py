"""Launch dry-runs print the exact commands (nothing is run): v5p-128, a 2-slice v5e-256, Slurm."""
import shlex
import subprocess
import sys

ROOT = __file__.rsplit("/tests/", 1)[0]
TRAIN = ["--", "--config", "configs/sphinx.py:sphinx_1k", "--workdir", "/gcs/bucket/run"]
COMMON = ["--name", "sx", "--zone", "us-east5-a", "--project", "proj", "--dry-run"]


def dry_run(script, *args):
  out = subprocess.run([sys.executable, f"launch/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                       check=True)
  return [shlex.split(line) for line in out.stdout.strip().splitlines()]


def test_v5p_128_single_slice():
  create, = dry_run("tpu.py", "create", "--tpu", "v5p-128", *COMMON)
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "sx", "--zone=us-east5-a", "--project=proj",
                    "--accelerator-type=v5p-128", "--version=v2-alpha-tpuv5"]
  run, = dry_run("tpu.py", "run", "--tpu", "v5p-128", *COMMON, *TRAIN)
  assert run[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sx", "--zone=us-east5-a", "--project=proj",
                     "--worker=all"]
  assert "sphinx-jax train --config configs/sphinx.py:sphinx_1k --workdir /gcs/bucket/run" in run[9]
  delete, = dry_run("tpu.py", "delete", "--tpu", "v5p-128", *COMMON)
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "sx", "--zone=us-east5-a", "--project=proj",
                    "--quiet"]


def test_two_slice_v5e_256_goes_through_queued_resources():
  create, = dry_run("tpu.py", "create", "--tpu", "v5e-256", "--num-slices", "2", *COMMON)
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "sx", "--zone=us-east5-a",
                    "--project=proj", "--accelerator-type=v5litepod-256", "--runtime-version=v2-alpha-tpuv5-lite",
                    "--node-count=2", "--node-prefix=sx"]
  runs = dry_run("tpu.py", "run", "--tpu", "v5e-256", "--num-slices", "2", *COMMON, *TRAIN)
  assert [r[5] for r in runs] == ["sx-0", "sx-1"] and all("--worker=all" in r for r in runs)
  installs = dry_run("tpu.py", "install", "--tpu", "v5e-256", "--num-slices", "2", *COMMON)
  assert installs[0][:3] == ["git", "-C", ROOT] and "archive" in installs[0]
  assert any("jax[tpu]==0.10.2" in r[-1] for r in installs if r[4] == "ssh")
  delete, = dry_run("tpu.py", "delete", "--tpu", "v5e-256", "--num-slices", "2", *COMMON)
  assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "sx"]


def test_mount_puts_the_bucket_at_one_path_on_every_worker_of_every_slice():
  mounts = dry_run("tpu.py", "mount", "--bucket", "bkt", "--tpu", "v5e-256", "--num-slices", "2", *COMMON)
  assert [m[:7] for m in mounts] == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, "--zone=us-east5-a"]
                                     for node in ("sx-0", "sx-1")]
  for m in mounts:
    assert "--worker=all" in m
    command = m[-1]
    assert command.startswith("--command=(command -v gcsfuse > /dev/null || (")
    assert "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" in command
    assert command.endswith("(mountpoint -q /gcs/bkt || gcsfuse --implicit-dirs --rename-dir-limit=100000 bkt "
                             "/gcs/bkt)")


def test_a_bucket_url_as_workdir_is_refused_with_the_mount_hint():
  out = subprocess.run([sys.executable, "launch/tpu.py", "run", "--tpu", "v5p-128", *COMMON, "--", "--config",
                        "configs/sphinx.py:sphinx_1k", "--workdir", "gs://bkt/run"], cwd=ROOT, capture_output=True,
                       text=True)
  assert out.returncode == 2 and out.stdout == ""
  assert "run: gs://bkt/run: the trainer writes to a directory every worker sees; mount the bucket first" in out.stderr


def test_bad_tpu_name_is_refused():
  out = subprocess.run([sys.executable, "launch/tpu.py", "create", "--tpu", "v7-8", *COMMON], cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode != 0 and "v7-8" in out.stderr


def test_slurm_script():
  out = subprocess.run([sys.executable, "launch/slurm.py", "--nodes", "4", "--partition", "a100", "--dry-run",
                        *TRAIN], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  assert "#SBATCH --nodes=4" in out and "#SBATCH --gpus-per-node=8" in out
  assert "--num_processes=\\$SLURM_NTASKS --process_id=\\$SLURM_PROCID" in out
  assert out.strip().endswith("sbatch '<batch script above>'")
