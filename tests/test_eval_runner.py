"""`sphinx-jax eval` end to end on a tiny random SPHINX (ConvNeXt + DINOv2 towers at 224 px, the demo's
SentencePiece tokenizer): per-sample JSONL and summary; a run SIGKILLed midway resumes without generating or
re-scoring finished samples and ends with the same rows and summary as an uninterrupted run."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

import sphinx_jax
from configs.sphinx import get_config
from sphinx_jax import checkpoint, cli
from sphinx_jax.eval import benchmarks, metrics, runner
from sphinx_jax.models import sphinx as sphinx_model

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "configs" / "assets" / "demo_tokenizer.model"
SIZES = [(64, 32), (32, 64), (48, 48)]  # wide, tall, square
NUM_QUESTIONS = 16
OBJECTS = ["circle", "square", "red box", "triangle", "dog", "point"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  config = get_config("tiny_sphinx_tiny")
  config.model.update(image_size=224)
  config.model.llm.vocab_size = 768
  shapes = jax.eval_shape(sphinx_model.Sphinx(config.model).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                          jnp.zeros((1, 224, 224, 3)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
                        nn.meta.unbox(shapes)["params"])
  return checkpoint.save_model_dir(tmp_path_factory.mktemp("eval") / "m", params, config, tokenizer=TOKENIZER)


@pytest.fixture(scope="module")
def pope_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("pope")
  (root / "val2014").mkdir()
  rng = np.random.default_rng(1)
  for i, size in enumerate(SIZES):
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "val2014" / f"{i}.jpg")
  lines = [{"question_id": q, "image": f"{q % len(SIZES)}.jpg", "label": "yes" if q % 3 else "no",
            "text": f"Is there a {OBJECTS[q % len(OBJECTS)]} in the image?"} for q in range(NUM_QUESTIONS)]
  (root / "coco_pope_random.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
  return root


def read_rows(path):
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(model_dir, pope_dir, tmp_path_factory):
  """One uninterrupted CLI run, batch 2: its rows, summary and printed table."""
  out = tmp_path_factory.mktemp("full") / "pope.jsonl"
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    code = cli.main(["eval", "--ckpt", str(model_dir), "--benchmark", "pope", "--data", str(pope_dir),
                     "--batch-size", "2", "--out", str(out)])
  assert code == 0
  return read_rows(out), json.loads(out.with_name("pope.jsonl.summary.json").read_text()), stdout.getvalue()


def test_eval_writes_rows_and_summary(full_run):
  rows, summary, printed = full_run
  assert [r["id"] for r in rows] == [str(q) for q in range(NUM_QUESTIONS)]
  # the summary is the official POPE scoring of exactly the written outputs
  want = {k: 100 * v for k, v in metrics.pope_scores([r["output"] for r in rows], [r["truth"] for r in rows]).items()}
  assert summary == {**want, "samples": NUM_QUESTIONS, "malformed": 0}
  for r in rows:
    question = f"Is there a {OBJECTS[int(r['id']) % len(OBJECTS)]} in the image?"
    assert r["prompt"].endswith(f"\n\n### Human: {question}\n### Assistant:")  # POPE: no suffix, no pre-fill
    assert r["score"] == float(r["parsed"] == r["truth"])
  assert printed.startswith("pope (random)\n") and f"accuracy   {summary['accuracy']:.2f}" in printed


def test_killed_run_resumes_without_redoing_samples(model_dir, pope_dir, full_run, tmp_path):
  reference_rows, reference, _ = full_run
  out = tmp_path / "killed.jsonl"
  command = [sys.executable, "-m", "sphinx_jax", "eval", "--ckpt", str(model_dir), "--benchmark", "pope",
             "--data", str(pope_dir), "--batch-size", "2", "--out", str(out)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if out.exists() and out.read_text().count("\n") >= 4:
      break
    time.sleep(0.005)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  before = out.read_text().splitlines()
  assert 4 <= len(before) < NUM_QUESTIONS, "the run must be killed midway for this test to mean anything"
  finished = [json.loads(line) for line in before if line.endswith("}")]

  handle = sphinx_jax.load(model_dir)
  generated = []
  real = handle.generator.generate
  handle.generator.generate = lambda prompts, *a, **k: generated.extend(prompts) or real(prompts, *a, **k)
  summary = runner.evaluate(handle, "pope", pope_dir, out, batch_size=2, progress=False)
  rows = read_rows(out)
  todo = NUM_QUESTIONS - len(finished)
  padded = todo + todo % 2 if todo > 2 else todo                # the runner fills the last batch up to 2 rows
  assert len(generated) == padded                               # finished samples were not generated again
  assert rows[:len(finished)] == finished                       # ... nor rewritten or re-scored
  assert sorted(r["id"] for r in rows) == sorted(str(q) for q in range(NUM_QUESTIONS))
  by_id = {r["id"]: r for r in reference_rows}
  assert all(r == by_id[r["id"]] for r in rows)
  assert summary == reference


def test_bad_inputs_are_one_line_errors(model_dir, pope_dir, tmp_path, capsys):
  (tmp_path / "val2014").mkdir()
  (tmp_path / "coco_pope_random.json").write_text(json.dumps(
      {"question_id": 1, "image": "missing.jpg", "text": "Is there a cat?", "label": "yes"}) + "\n")
  args = ["eval", "--ckpt", str(model_dir), "--benchmark", "pope", "--out", str(tmp_path / "o.jsonl")]
  assert cli.main(args + ["--data", str(tmp_path)]) == 2
  assert "1 images not found, e.g." in capsys.readouterr().err
  assert not (tmp_path / "o.jsonl").exists()
  (tmp_path / "o.jsonl").write_text(json.dumps({"id": "999", "output": "x"}) + "\n")
  assert cli.main(args + ["--data", str(pope_dir)]) == 2
  assert "ids of another run" in capsys.readouterr().err
  (tmp_path / "o.jsonl").write_text("[1, 2]\n" + json.dumps({"id": "1"}) + "\n")
  assert cli.main(args + ["--data", str(pope_dir)]) == 2
  assert "o.jsonl line 1 is not a prediction row" in capsys.readouterr().err


def test_malformed_outputs_are_counted_and_scored_wrong():
  rows = [{"output": "[0.1,0.2]", "truth": {"box": [0, 0, 10, 10], "width": 10, "height": 10}},
          {"output": "[0.00,0.00,1.00,1.00]", "truth": {"box": [0, 0, 10, 10], "width": 10, "height": 10}}]
  bench = benchmarks.get("refcoco")
  parsed = [bench.parse(r["output"]) for r in rows]
  scores = [bench.score(r["output"], r["truth"]) for r in rows]
  assert parsed == [None, [0.0, 0.0, 1.0, 1.0]] and scores == [0.0, 1.0]
  assert bench.summarize([dict(r, score=s) for r, s in zip(rows, scores)]) == {"accuracy": 50.0}
