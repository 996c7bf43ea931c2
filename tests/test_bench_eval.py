"""bench/eval.py --quick end to end: the real eval runner on a 5-view random SPHINX and a VQAv2-format fixture,
batched (4 rows, the last batch padded) and one at a time; the two must give the same answers, and the timed
passes must reuse the warm-up's compiled programs."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
  spec = importlib.util.spec_from_file_location("bench_eval", ROOT / "bench" / "eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_differences_names_each_changed_answer():
  bench = load_bench()
  assert bench.differences({"1": "yes", "2": "red"}, {"1": "yes", "2": "blue"}) == ["  id 2: 'red' vs 'blue'"]
  assert bench.differences({"1": "yes", "2": "red"}, {"2": "red"}) == []


def test_quick_run_gives_identical_answers_without_recompiling(capsys):
  code = load_bench().main(["--quick"])
  printed = capsys.readouterr().out
  assert code == 0, printed
  assert "answers identical: yes" in printed and "programs compiled in the timed passes: 0" in printed
  # the answers vary with the question and image, so "identical" compares something
  assert int(re.search(r"\((\d+) distinct answers", printed).group(1)) > 1
  # one program per batch size: the runner pads the last, partial batch instead of compiling for it
  assert re.findall(r"\((\d+) program\(s\) compiled", printed) == ["1", "1"]
