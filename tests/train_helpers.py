"""Shared by the trainer tests: a tiny text corpus + tokenizer, and `sphinx-jax train` run as a real subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

from sphinx_jax.data import shapes
from sphinx_jax.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 384


def write_corpus(folder: Path) -> tuple[Path, Path]:
  """(corpus.txt, tokenizer.model): world dialogue lines, one document per line, and a tokenizer trained on them."""
  folder.mkdir(parents=True, exist_ok=True)
  world = shapes.World(seed=1)
  lines = [t["value"].replace("\n", " ") for i in range(60) for task in shapes.WORLD_TASKS
           for t in world.sample(i, task)[1].conversations]
  corpus, tok = folder / "corpus.txt", folder / "tokenizer.model"
  corpus.write_text("\n".join(lines))
  tok.write_bytes(Tokenizer.train(lines, VOCAB).model_proto)
  return corpus, tok


def train_args(workdir, corpus, tok, *overrides):
  return ["-m", "sphinx_jax", "train", "--config", "configs/llama.py:tiny", "--workdir", str(workdir),
          f"--config.data.datasets.corpus.path={corpus}", f"--config.data.tokenizer={tok}",
          f"--config.model.llm.vocab_size={VOCAB}", "--config.data.max_len=48", *overrides]


def demo_args(workdir, steps, *overrides):
  """configs/demo.py (towers frozen) cut to `steps` steps of 2 rows, a checkpoint every 2, no evaluation."""
  return ["-m", "sphinx_jax", "train", "--config", "configs/demo.py", "--workdir", str(workdir),
          f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=2", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.eval_at_start=False", "--config.data.global_batch_size=2",
          "--config.data.num_workers=1", *overrides]


def env(devices: int = 8) -> dict:
  e = dict(os.environ, JAX_PLATFORMS="cpu")
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return e


def run_train(args, devices: int = 8, timeout: int = 600) -> subprocess.CompletedProcess:
  out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env(devices), capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def start_train(args, devices: int = 8) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(devices), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def losses(workdir) -> dict[int, float]:
  """step -> loss from metrics.jsonl; a step logged twice (before a crash and after the resume) keeps the last."""
  out = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      out[record["step"]] = record["loss"]
  return out


def logged_steps(workdir) -> int:
  path = Path(workdir) / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0
