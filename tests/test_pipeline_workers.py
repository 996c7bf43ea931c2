"""Grain worker processes do not outlive a training process killed with SIGKILL (pipeline.exit_with_parent)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
