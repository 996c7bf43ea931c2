"""`kill -9` during training and during a checkpoint write, then the same command again: the run resumes from
the last complete checkpoint and its losses equal an uninterrupted run's bit for bit (CPU). A checkpoint saved
on one mesh restores onto another and training continues."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from sphinx_jax import host_memory

from train_helpers import losses, logged_steps, run_train, start_train, train_args, write_corpus

STEPS = 12

pytestmark = pytest.mark.slow  # real subprocesses / whole-model compiles: the second CI stage


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference") / "run"
  run_train(train_args(workdir, *corpus, f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=4"))
  ref = losses(workdir)
  assert sorted(ref) == list(range(1, STEPS + 1))
  # `sphinx-jax` restarted itself on jemalloc where there is one (these kills and resumes run on it)
  expected = "jemalloc" if host_memory.allocator_library() else "system"
  assert json.loads((workdir / "summary.json").read_text())["host_allocator"] == expected
  return ref


def kill_when(proc, condition, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read()[-2000:]}"
    assert time.time() < deadline, "training did not reach the kill point in time"
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()


def checkpoint_steps(workdir):
  folder = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def test_kill_during_training_resumes_exactly(corpus, reference, tmp_path):
  workdir = tmp_path / "run"
  args = train_args(workdir, *corpus, f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=4")
  proc = start_train(args)
  kill_when(proc, lambda: logged_steps(workdir) >= 6)
  assert losses(workdir) and max(losses(workdir)) < STEPS
  run_train(args)
  assert losses(workdir) == reference


def interrupted_writes(workdir):
  folder = Path(workdir) / "checkpoints"
  return [p.name for p in folder.iterdir() if "tmp" in p.name] if folder.exists() else []


def test_kill_during_checkpoint_write_never_resumes_from_it(corpus, reference, tmp_path):
  """Checkpoints every step (async), killed at varying moments until one kill lands inside a write."""
  for attempt in range(6):
    workdir = tmp_path / f"run{attempt}"
    args = train_args(workdir, *corpus, f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=1")
    proc = start_train(args)
    kill_when(proc, lambda: interrupted_writes(workdir) and logged_steps(workdir) >= 3)
    if interrupted_writes(workdir):
      break
  else:
    pytest.fail("no kill landed inside a checkpoint write in 6 attempts")
  partial = interrupted_writes(workdir)
  complete = checkpoint_steps(workdir)
  run_train(args)
  assert losses(workdir) == reference, (partial, complete)
  assert not interrupted_writes(workdir)


def child_pids(pid):
  """Live processes whose parent is `pid` (the Grain data workers of a trainer)."""
  children = []
  for entry in Path("/proc").iterdir():
    try:
      if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
        children.append(int(entry.name))
    except OSError:  # the process ended while we looked
      pass
  return children


def alive(pid):
  try:
    os.kill(pid, 0)
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except (ProcessLookupError, FileNotFoundError):
    return False


def test_sigterm_checkpoints_stops_cleanly_and_resumes_exactly(corpus, reference, tmp_path):
  """A preempted VM's SIGTERM: the trainer saves the step it reached, stops its data workers, exits 143, and
  the same command finishes the run with the uninterrupted losses (no checkpoint was due before the signal)."""
  workdir = tmp_path / "run"
  args = train_args(workdir, *corpus, f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=100",
                    "--config.data.num_workers=1")
  proc = start_train(args)
  deadline = time.time() + 300
  while logged_steps(workdir) < 5:
    assert proc.poll() is None, f"training ended before the signal: {proc.stderr.read()[-2000:]}"
    assert time.time() < deadline, "training did not reach step 5 in time"
    time.sleep(0.05)
  workers = child_pids(proc.pid)
  assert workers, "expected a data worker process"
  os.kill(proc.pid, signal.SIGTERM)
  assert proc.wait(timeout=180) == 143, proc.stderr.read()[-2000:]
  saved = checkpoint_steps(workdir)
  assert len(saved) == 1 and 5 <= saved[0] < STEPS
  deadline = time.time() + 20
  while any(alive(w) for w in workers) and time.time() < deadline:
    time.sleep(0.2)
  assert not any(alive(w) for w in workers), "data workers outlived the trainer"
  run_train(args)
  assert losses(workdir) == reference


def test_restore_onto_another_mesh(corpus, reference, tmp_path):
  """Saved with (fsdp=8), continued with (data=2, fsdp=4): the state is resharded and training continues."""
  workdir = tmp_path / "run"
  base = train_args(workdir, *corpus, f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=4")
  run_train([*base, "--config.mesh.data=1", "--config.mesh.fsdp=8", "--stop_after=4"])
  assert checkpoint_steps(workdir) == [4]
  run_train([*base, "--config.mesh.data=2", "--config.mesh.fsdp=4"])
  resumed = losses(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  for step in range(5, STEPS + 1):  # other reduction order on the new mesh: equal up to float rounding
    assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
