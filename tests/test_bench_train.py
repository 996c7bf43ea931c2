"""bench/train.py --quick end to end: the bare jitted step, the PyTorch reference step and the roof GEMMs timed in
one run, and the real trainer (Grain worker process, logging windows, async checkpoints) against the bare step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_reports_mfu_and_trainer_overhead(tmp_path):
  out = tmp_path / "results.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  run = subprocess.run([sys.executable, "bench/train.py", "--quick", "--iters", "1", "--gemm", "256",
                        "--trainer-runs", "2", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  [r] = json.loads(out.read_text())
  assert r["config"] == "quick" and "of roof" in run.stdout and "overhead" in run.stdout
  # Every decoder position counts: 2 rows of the demo's max_len, image tokens (259 without the Q-Former) included.
  from configs.demo import get_config
  assert (r["rows"], r["positions"]) == (2, get_config().data.max_len)
  for key in ("flops", "roof", "jax_s", "torch_s", "jax_mfu", "torch_mfu"):
    assert np.isfinite(r[key]) and r[key] > 0, key
  t = r["trainer"]
  # Per run one warm-up window (dropped) + 2 measured windows of 2 steps, and 2 bare windows before the first run
  # and after each; async checkpoints at 2, 4 and the last step.
  assert len(t["loop_windows"]) == 4 and len(t["bare_windows"]) == 6 and len(t["run_overheads"]) == 2
  assert t["checkpoints"] == [2, 4, 6] and t["workers"] == 1
  assert np.isfinite(t["overhead"]) and t["loop_s"] > 0 and t["bare_s"] > 0
