"""Two JAX processes on loopback, 4 host devices each, train like one process with 8 devices: the same global
batches (the data pipeline cuts every global batch into per-process rows) and the same losses."""
import socket
import subprocess
import sys

import numpy as np
import pytest

from train_helpers import ROOT, env, losses, run_train, train_args, write_corpus

STEPS = 6

pytestmark = pytest.mark.slow  # real subprocesses / whole-model compiles: the second CI stage


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  corpus, tok = write_corpus(tmp_path / "corpus")
  common = (f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=3")
  single = tmp_path / "single"
  run_train(train_args(single, corpus, tok, *common), devices=8)

  multi = tmp_path / "multi"
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, *train_args(multi, corpus, tok, *common),
                             f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, env=env(devices=4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
  expected, got = losses(single), losses(multi)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in expected:  # cross-process all-reduces (gloo) may sum in another order than in-process ones
    assert got[step] == pytest.approx(expected[step], rel=1e-5), step
  assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def test_a_workdir_the_processes_do_not_share_is_refused(tmp_path):
  """Each process given its own directory (a worker's local disk): every process stops with the reason, before
  any checkpoint is split across them."""
  corpus, tok = write_corpus(tmp_path / "corpus")
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen([sys.executable, *train_args(tmp_path / f"local{i}", corpus, tok),
                             f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                            cwd=ROOT, env=env(devices=1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "processes [1] do not see the files process 0 writes there" in err, err[-3000:]
  assert not any((tmp_path / f"local{i}" / "checkpoints").exists() for i in range(2))


def test_two_processes_write_the_frozen_towers_once(tmp_path):
  """The demo's model (towers frozen) on two processes: WORKDIR/frozen_params is written collectively, holds the
  towers of `train.towers_from` bit for bit, and the export of the saved step joins them with the trained parts."""
  from configs.demo import ASSETS
  from sphinx_jax import checkpoint
  workdir, model = tmp_path / "run", tmp_path / "model"
  address = f"127.0.0.1:{free_port()}"
  args = ["-m", "sphinx_jax", "train", "--config", "configs/demo.py", "--workdir", str(workdir),
          "--config.train.num_steps=2", "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
          "--config.train.eval_at_start=False", "--config.data.global_batch_size=2", "--config.data.num_workers=1",
          f"--config.train.export_to={model}", f"--coordinator_address={address}", "--num_processes=2"]
  procs = [subprocess.Popen([sys.executable, *args, f"--process_id={i}"], cwd=ROOT, env=env(devices=1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for proc in procs:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
  towers = sorted(p for p in checkpoint.abstract_params(ASSETS / "demo_towers") if p.startswith("towers/"))
  assert sorted(checkpoint.orbax_shapes(workdir / "frozen_params")) == towers
  exported, start = checkpoint.flatten(checkpoint.load_model_dir(model)[0]), checkpoint.restore_leaves(
      ASSETS / "demo_towers", towers)
  assert any(p.startswith("llm/") for p in exported)
  for path in towers:
    np.testing.assert_array_equal(exported[path], start[path], err_msg=path)
