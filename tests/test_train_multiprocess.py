"""Two JAX processes on loopback, 4 host devices each, train like one process with 8 devices: the same global
batches (the data pipeline cuts every global batch into per-process rows) and the same losses."""
import socket
import subprocess
import sys

import numpy as np
import pytest

from train_helpers import ROOT, demo_args, env, losses, run_train, train_args, write_corpus

STEPS = 6

pytestmark = pytest.mark.slow  # real subprocesses / whole-model compiles: the second CI stage


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def two_processes(args_of, devices: int, timeout: int = 600) -> list[tuple[int, str]]:
  """(exit status, stderr) of two `sphinx-jax` processes on loopback; `args_of(i)`: process i's arguments."""
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, *args_of(i), f"--coordinator_address={address}", "--num_processes=2",
                             f"--process_id={i}"], cwd=ROOT, env=env(devices=devices), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  errors = [proc.communicate(timeout=timeout)[1] for proc in procs]
  return [(proc.returncode, err) for proc, err in zip(procs, errors)]


def test_two_processes_match_one(tmp_path):
  corpus, tok = write_corpus(tmp_path / "corpus")
  common = (f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=3")
  single = tmp_path / "single"
  run_train(train_args(single, corpus, tok, *common), devices=8)

  multi = tmp_path / "multi"
  for code, err in two_processes(lambda i: train_args(multi, corpus, tok, *common), devices=4):
    assert code == 0, err[-3000:]
  expected, got = losses(single), losses(multi)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in expected:  # cross-process all-reduces (gloo) may sum in another order than in-process ones
    assert got[step] == pytest.approx(expected[step], rel=1e-5), step
  assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def test_a_workdir_the_processes_do_not_share_is_refused(tmp_path):
  """Each process given its own directory (a worker's local disk): every process stops with the reason, before
  any checkpoint is split across them."""
  corpus, tok = write_corpus(tmp_path / "corpus")
  for code, err in two_processes(lambda i: train_args(tmp_path / f"local{i}", corpus, tok), devices=1, timeout=300):
    assert code == 2, err[-3000:]
    assert "processes [1] do not see the files process 0 writes there" in err, err[-3000:]
  assert not any((tmp_path / f"local{i}" / "checkpoints").exists() for i in range(2))


def test_two_processes_write_the_frozen_towers_once(tmp_path):
  """The demo's model (towers frozen) on two processes: WORKDIR/frozen_params is written collectively, holds the
  towers of `train.towers_from` bit for bit, and the export of the saved step joins them with the trained parts."""
  from configs.demo import ASSETS
  from sphinx_jax import checkpoint
  workdir, model = tmp_path / "run", tmp_path / "model"
  for code, err in two_processes(lambda i: demo_args(workdir, 2, f"--config.train.export_to={model}"), devices=1):
    assert code == 0, err[-3000:]
  towers = sorted(p for p in checkpoint.abstract_params(ASSETS / "demo_towers") if p.startswith("towers/"))
  assert sorted(checkpoint.orbax_shapes(workdir / "frozen_params")) == towers
  exported, start = checkpoint.flatten(checkpoint.load_model_dir(model)[0]), checkpoint.restore_leaves(
      ASSETS / "demo_towers", towers)
  assert any(p.startswith("llm/") for p in exported)
  for path in towers:
    np.testing.assert_array_equal(exported[path], start[path], err_msg=path)


def test_each_process_traces_its_own_profile_window(tmp_path):
  corpus, tok = write_corpus(tmp_path / "corpus")
  run = tmp_path / "run"
  window = ("--config.train.num_steps=4", "--config.train.profile_at=2", "--config.train.profile_steps=2")
  for code, err in two_processes(lambda i: train_args(run, corpus, tok, *window), devices=2):
    assert code == 0, err[-3000:]
  for i in range(2):
    summaries = list((run / "tensorboard" / f"process_{i}" / "plugins" / "profile").glob("*/summary.txt"))
    assert len(summaries) == 1, i
    assert summaries[0].read_text().startswith("steps 2-3 of jit_step"), i
    assert list(summaries[0].parent.glob("*.xplane.pb")), i
