"""Grain worker processes: they do not outlive a training process killed with SIGKILL (pipeline.exit_with_parent),
and they run under the scheduling policy `data.worker_sched` names (pipeline.run_when_idle)."""
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from configs.demo import get_config
from sphinx_jax import config as cfg
from sphinx_jax.data import pipeline
from sphinx_jax.data.tokenizer import Tokenizer
from sphinx_jax.errors import SphinxError

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import os, signal, sys
    from configs.demo import get_config
    from sphinx_jax import config as cfg
    from sphinx_jax.data import pipeline
    from sphinx_jax.data.tokenizer import Tokenizer

    if __name__ == "__main__":
      c = get_config()
      c.data.update(global_batch_size=2, num_workers=1)
      it = pipeline.make_iterator(c.data, Tokenizer.from_file(c.data.tokenizer), image_size=c.model.image_size,
                                  image_words=cfg.image_tokens(c.model), shard_index=0, shard_count=1)
      next(it)
      me = str(os.getpid())
      kids = []
      for p in os.listdir("/proc"):
        try:
          if p.isdigit() and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == me:
            kids.append(p)
        except OSError:
          pass
      open(sys.argv[1], "w").write(" ".join(kids))
      os.kill(os.getpid(), signal.SIGKILL)
""")


def alive(pid: str) -> bool:
  try:
    state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
  except OSError:
    return False
  return state != "Z"  # an exited orphan may wait as a zombie for a PID 1 that does not reap


def test_workers_exit_when_the_training_process_is_killed(tmp_path):
  script, pids_file, log = tmp_path / "child.py", tmp_path / "pids", tmp_path / "log"
  script.write_text(CHILD)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  with open(log, "w") as out:  # not a pipe: a surviving worker would hold it open
    child = subprocess.Popen([sys.executable, str(script), str(pids_file)], cwd=ROOT, env=env, stdout=out,
                             stderr=subprocess.STDOUT)
    assert child.wait(timeout=300) == -signal.SIGKILL, log.read_text()[-2000:]
  workers = pids_file.read_text().split()
  assert workers, "the pipeline started no worker process"
  deadline = time.time() + 20
  while any(alive(p) for p in workers) and time.time() < deadline:
    time.sleep(0.2)
  survivors = [p for p in workers if alive(p)]
  for p in survivors:
    os.kill(int(p), signal.SIGKILL)
  assert not survivors, f"worker processes {survivors} outlived the killed training process"


def demo_iterator(**data):
  c = get_config()
  c.data.update(global_batch_size=2, num_workers=1, **data)
  return pipeline.make_iterator(c.data, Tokenizer.from_file(c.data.tokenizer), image_size=c.model.image_size,
                                image_words=cfg.image_tokens(c.model), shard_index=0, shard_count=1)


def thread_policies(pid: int) -> set:
  return {os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.mark.parametrize("sched, policy", [("idle", os.SCHED_IDLE), ("normal", os.SCHED_OTHER)])
def test_every_worker_thread_runs_under_the_configured_policy(sched, policy):
  it = demo_iterator(worker_sched=sched)
  try:
    next(it)
    workers = multiprocessing.active_children()
    assert workers, "the pipeline started no worker process"
    assert all(thread_policies(w.pid) == {policy} for w in workers), [thread_policies(w.pid) for w in workers]
  finally:
    it.close()


def test_an_unknown_worker_policy_is_named():
  with pytest.raises(SphinxError, match=r"config\.data\.worker_sched: 'low'; use one of"):
    demo_iterator(worker_sched="low")


def test_without_sched_idle_the_worker_takes_the_lowest_nice_level():
  code = "import os; del os.SCHED_IDLE; from sphinx_jax.data import pipeline; pipeline.run_when_idle(); " \
         "print(os.getpriority(os.PRIO_PROCESS, 0))"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
  assert out.stdout.split() == ["19"], out.stderr[-2000:]


def test_a_worker_that_may_not_change_its_policy_warns_and_carries_on(monkeypatch, caplog):
  def refuse(*args):
    raise PermissionError(1, "Operation not permitted")
  monkeypatch.setattr(os, "sched_setscheduler", refuse)
  pipeline.run_when_idle()
  assert "cannot switch to SCHED_IDLE" in caplog.text and "worker_sched='normal'" in caplog.text
