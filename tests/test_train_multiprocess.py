"""Two JAX processes on loopback, 4 host devices each, train like one process with 8 devices: the same global
batches (the data pipeline cuts every global batch into per-process rows) and the same losses."""
import socket
import subprocess
import sys

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
