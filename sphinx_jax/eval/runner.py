"""`sphinx-jax eval`: a checkpoint on one benchmark, batched, resumable; mirrors
`accessory/eval_mm/inference_image_sphinx.py` (prompts in the chat template, per-benchmark max_new_tokens,
stop at "###") followed by the benchmark's official scoring (eval/metrics.py).

Predictions stream to OUT (JSON lines, one per sample: id, prompt, output, parsed, truth, score), flushed
after every batch, so a killed run resumes where it stopped: finished ids are never generated or scored again
(a torn last line from the kill is dropped). Every generate call of a run gets the same number of rows (the
last batch is filled up with repeats of its last sample, whose outputs are dropped), so one compiled program
serves the whole run. At the end the summary (the benchmark's metrics, samples, malformed = replies the parser
could not read, scored wrong) is printed as a table and written to OUT.summary.json (temp file, then rename).
Greedy by default (the paper's numbers; the original's script defaults to temperature 0.1, top-p 0.75).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sphinx_jax.data import conversation
from sphinx_jax.errors import SphinxError
from sphinx_jax.eval import benchmarks

def read_done(path: Path) -> dict[str, dict]:
  """Rows already written, by id. A last line cut by a kill is dropped (and rewritten away); a bad line
  elsewhere means the file is not ours."""
  if not path.exists():
    return {}
  lines = path.read_text().splitlines()
  rows = {}
  for n, line in enumerate(lines, 1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if n == len(lines):
        _rewrite(path, lines[:-1])
        break
      raise SphinxError(f"eval: {path} line {n} is not JSON; pass a fresh --out or delete the file.") from None
    if not isinstance(row, dict) or "id" not in row:
      raise SphinxError(f"eval: {path} line {n} is not a prediction row; pass a fresh --out or delete the file.")
    rows[row["id"]] = row
  return rows


def _rewrite(path: Path, lines: list[str]) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(line + "\n" for line in lines))
  os.replace(tmp, path)


def _check(samples, done: dict, name: str, out: Path) -> None:
  ids = [s.id for s in samples]
  if len(set(ids)) != len(ids):
    raise SphinxError(f"eval {name}: the annotation file repeats sample ids; de-duplicate it.")
  stray = set(done) - set(ids)
  if stray:
    raise SphinxError(f"eval {name}: {out} holds ids of another run (e.g. {sorted(stray)[0]}); pass a fresh --out.")
  missing = [s.image for s in samples if isinstance(s.image, str) and s.id not in done and not Path(s.image).is_file()]
  if missing:
    raise SphinxError(f"eval {name}: {len(missing)} images not found, e.g. {missing[0]}; check --data's layout "
                      "(see `sphinx_jax/eval/benchmarks.py`).")


def fill_batch(ids: list[list[int]], pixels: np.ndarray, rows: int) -> tuple[list[list[int]], np.ndarray]:
  """Repeats the last sample up to `rows`: every generate call of a run then has the same batch size, so the
  last, partial batch reuses the compiled program instead of compiling the whole model again. Rows past
  len(ids) are dropped by the caller (zip with the chunk). pixels uint8[B, S, S, 3] -> uint8[rows, S, S, 3]."""
  extra = rows - len(ids)
  return ids + ids[-1:] * extra, np.concatenate([pixels, np.repeat(pixels[-1:], extra, axis=0)])


def evaluate(handle, name: str, data, out, *, split: str | None = None, batch_size: int = 8,
             temperature: float = 0.0, top_p: float = 0.75, progress: bool = True) -> dict[str, float]:
  """Runs (or finishes) one benchmark; returns the summary written to OUT.summary.json."""
  bench = benchmarks.get(name)
  samples = bench.read(Path(data), split or bench.split)
  if not samples:
    raise SphinxError(f"eval {name}: no samples in {data} for split {split or bench.split}.")
  out = Path(out)
  done = read_done(out)
  _check(samples, done, name, out)
  todo = [s for s in samples if s.id not in done]
  generator, tokenizer = handle.generator, handle.tokenizer
  rows_per_call = min(batch_size, len(todo))
  with out.open("a") as f, tqdm(total=len(samples), initial=len(samples) - len(todo), desc=name,
                                disable=not progress) as bar:
    for start in range(0, len(todo), batch_size):
      chunk = todo[start:start + batch_size]
      prompts = [conversation.render_prompt([], s.question, s.prefill) for s in chunk]
      ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
      pixels = np.stack([handle.pixels(s.image) for s in chunk])
      ids, pixels = fill_batch(ids, pixels, rows_per_call)
      outputs = generator.generate(ids, pixels, max_new_tokens=bench.max_new_tokens, temperature=temperature,
                                   top_p=top_p)
      for s, prompt, output in zip(chunk, prompts, outputs):
        row = {"id": s.id, "prompt": prompt, "output": output, "parsed": bench.parse(output),
               "truth": s.truth, "score": bench.score(output, s.truth)}
        done[s.id] = row
        f.write(json.dumps(row) + "\n")
      f.flush()
      bar.update(len(chunk))
  rows = [done[s.id] for s in samples]
  summary = {**bench.summarize(rows), "samples": len(rows), "malformed": sum(r["parsed"] is None for r in rows)}
  tmp = out.with_name(out.name + ".summary.json.tmp")
  tmp.write_text(json.dumps(summary, indent=1))
  os.replace(tmp, out.with_name(out.name + ".summary.json"))
  return summary


def table(name: str, summary: dict) -> str:
  width = max(len(k) for k in summary)
  return "\n".join([name] + [f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"
                             for k, v in summary.items()])


def add_eval_parser(subparsers) -> None:
  p = subparsers.add_parser("eval", help="score a checkpoint on a benchmark (resumable)")
  p.add_argument("--ckpt", required=True, help="model directory (train, convert or mix output)")
  p.add_argument("--benchmark", required=True, choices=sorted(benchmarks.BENCHMARKS))
  p.add_argument("--data", required=True, help="the benchmark's directory, official layout")
  p.add_argument("--split", default=None, help="default: the benchmark's usual split")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--out", default=None, help="predictions JSONL (default: <benchmark>_<split>.jsonl)")
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top-p", type=float, default=0.75)
  p.set_defaults(func=_run)


def _run(args) -> int:
  import sphinx_jax  # the handle loads JAX and the model; keep `sphinx-jax --help` light

  if args.batch_size < 1:
    raise SphinxError(f"eval: --batch-size is {args.batch_size}; give at least 1.")
  split = args.split or benchmarks.get(args.benchmark).split
  out = args.out or f"{args.benchmark}_{split}.jsonl"
  summary = evaluate(sphinx_jax.load(args.ckpt), args.benchmark, args.data, out, split=split,
                     batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p)
  print(table(f"{args.benchmark} ({split})", summary))
  return 0
