"""A window of train steps traced with `jax.profiler` and summarised by model scope (`train.profile_at`,
`train.profile_steps`); the role of MaxText's `profiler: xplane` with its skipped first steps, and of big_vision's
`xprof` window. The original (PyTorch, LLaMA2-Accessory) has no such switch.

Where the trace goes: WORKDIR/tensorboard/plugins/profile/<time>/ (one run directory per process under
`process_<i>/` when there are several), beside the run's TensorBoard events, so TensorBoard's Profile tab lists it
(`<host>.xplane.pb`); its `*.trace.json.gz` opens in ui.perfetto.dev without TensorBoard. `summary.txt` beside
them says where the step's XLA op time went: per phase (forward, backward, the update after them) and per model
scope, i.e. the Flax module path of each op's `op_name` metadata with layer numbers folded
(`llm/layers_*/attention`), then the slowest single ops. Op time is summed over the threads of the process's
devices (on a CPU the host's thread pool, so it can exceed the wall time of a step). The summary reads the trace
events that carry `hlo_op` / `hlo_module` stats, as XLA CPU writes them; it was checked on CPU only (no
accelerator here), and says so when a trace holds no such events.
"""
from __future__ import annotations

import collections
import re
from pathlib import Path

import jax

TOP_OPS = 15  # single ops listed in the summary
SCOPE_DEPTH = 3  # module path components kept in a scope: `towers/convnext/stages_*`, `llm/layers_*/attention`
# `jit(step)/transpose(jvp(Sphinx))/llm/...`: the backward of the model; `jvp(...)` alone its forward
_PHASES = (("transpose(jvp(", "backward"), ("jvp(", "forward"))
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) .*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_FIRST_OPERAND = re.compile(r" = [^ ]+ [\w\-]+\(%([\w.\-]+)")
_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)", re.M)
# path components that name no module: transformations, method calls (`Sphinx.encode_images`), scan bodies
_NOT_A_MODULE = re.compile(r"^(jit\(.*|.*\(.*\)|[A-Za-z_]+\.\w+|while|body|cond|closed_call|checkpoint|remat)$")


def phase_and_scope(op_name: str, depth: int = SCOPE_DEPTH) -> tuple[str, str]:
  """An op's `op_name` metadata -> (phase, module scope).

  "jit(step)/jvp(Sphinx)/Sphinx._inputs/Sphinx.encode_images/towers/convnext/stages_1/while/body/closed_call/
  blocks/erfc" -> ("forward", "towers/convnext/stages_*");
  "jit(step)/transpose(jvp(Sphinx))/llm/llm._blocks/layers_3/attention/BKGTH,BKSH->BKGTS/dot_general" ->
  ("backward", "llm/layers_*/attention"); "jit(step)/sqrt" (the optimizer) -> ("update", "(step)"); "" (an op
  XLA added, such as a layout copy, with no metadata) -> ("unattributed", "(no op_name)"). The op's own name (the
  last component) is never part of the scope.
  """
  if not op_name:
    return "unattributed", "(no op_name)"
  phase = next((name for marker, name in _PHASES if marker in op_name), "update")
  parts = op_name.split("/")[:-1]
  if phase != "update":  # the scope starts after the transformed model's own component
    parts = parts[next(i for i, p in enumerate(parts) if "jvp(" in p) + 1:]
  modules = [re.sub(r"_\d+$", "_*", p) for p in parts if not _NOT_A_MODULE.match(p) and "->" not in p]
  return phase, "/".join(modules[:depth]) or "(step)"


def hlo_op_names(hlo_text: str) -> tuple[str, dict[str, str]]:
  """A compiled module's text (`Compiled.as_text()`) -> (module name, instruction name -> its op_name).

  An instruction XLA added without metadata takes the first op_name inside the computation it calls, else its
  first operand's: `wrapped_reduce-window.47 = f32[8,4,1,64,8] fusion(%broadcast_select_fusion.2, ...)` (a softmax
  row maximum split in two by XLA) is counted where `broadcast_select_fusion.2` is.
  """
  module = _MODULE.search(hlo_text)
  names, unnamed, first_in = {}, {}, {}
  computation = ""
  for line in hlo_text.splitlines():
    if not (instruction := _INSTRUCTION.match(line)):
      if header := _COMPUTATION.match(line):
        computation = header.group(1)
      continue
    if op_name := _OP_NAME.search(line):
      names[instruction.group(1)] = op_name.group(1)
      first_in.setdefault(computation, op_name.group(1))
    else:
      called, operand = _CALLS.search(line), _FIRST_OPERAND.search(line)
      unnamed[instruction.group(1)] = (called and called.group(1), operand and operand.group(1))
  for name, (called, operand) in unnamed.items():
    if found := first_in.get(called) or names.get(operand):
      names[name] = found
  return (module.group(1) if module else ""), names


def traced_op_times(xplane: Path, module: str) -> dict[str, tuple[float, int]]:
  """The XLA ops of `module` in a trace file -> op name -> (total self seconds, times run).

  Self time: an op that runs others inside it on its thread (a `while` running its body's ops) keeps only the
  time they leave, so no time is counted twice.
  """
  totals = collections.defaultdict(lambda: [0.0, 0])
  for plane in jax.profiler.ProfileData.from_file(str(xplane)).planes:
    for line in plane.lines:
      ops = []
      for event in line.events:
        stats = dict(event.stats)
        if stats.get("hlo_module") == module and "hlo_op" in stats:
          ops.append((event.start_ns, event.duration_ns, stats["hlo_op"]))
      for op, seconds in _self_times(ops):
        totals[op][0] += seconds
        totals[op][1] += 1
  return {op: (seconds, count) for op, (seconds, count) in totals.items()}


def _self_times(ops):
  """[(start ns, duration ns, name)] of one thread -> [(name, seconds)], each less the ops nested in it."""
  out, open_ops = [], []  # open_ops: [index into out, end ns] of the ops enclosing the current one
  for start, duration, name in sorted(ops, key=lambda op: (op[0], -op[1])):
    while open_ops and open_ops[-1][1] <= start:
      open_ops.pop()
    if open_ops:
      parent = open_ops[-1][0]
      out[parent] = (out[parent][0], out[parent][1] - duration * 1e-9)
    out.append((name, duration * 1e-9))
    open_ops.append((len(out) - 1, start + duration))
  return out


def summary_text(op_times: dict, op_names: dict, steps: int, title: str) -> str:
  """The summary.txt table: per phase, per scope, then the TOP_OPS slowest ops, in ms per step."""
  total = sum(seconds for seconds, _ in op_times.values())
  if not total:
    return (f"{title}\nno event of this trace names an op of the module (hlo_op / hlo_module stats): read the trace "
            "itself in TensorBoard's Profile tab or ui.perfetto.dev\n")
  by_phase, by_scope = collections.Counter(), collections.Counter()
  for op, (seconds, _) in op_times.items():
    phase, scope = phase_and_scope(op_names.get(op, ""))
    by_phase[phase] += seconds
    by_scope[(phase, scope)] += seconds

  def row(seconds, label):
    return f"{1e3 * seconds / steps:10.2f} {seconds / total:6.1%}  {label}"

  lines = [title, f"XLA op time per step: {1e3 * total / steps:.2f} ms over {len(op_times)} ops "
           "(summed over the threads of this process's devices)", "", "     ms/step  share  phase"]
  lines += [row(s, phase) for phase, s in by_phase.most_common()]
  lines += ["", "     ms/step  share  phase / model scope"]
  lines += [row(s, f"{phase} {scope}") for (phase, scope), s in by_scope.most_common()]
  lines += ["", "     ms/step  share  runs/step  op (op_name)"]
  slowest = sorted(op_times.items(), key=lambda item: -item[1][0])[:TOP_OPS]
  lines += [row(seconds, f"{runs / steps:9.0f}  {op} ({op_names.get(op, '?')})") for op, (seconds, runs) in slowest]
  return "\n".join(lines) + "\n"


class StepWindow:
  """Traces steps `start` .. `start + count - 1` (1-based, as the trainer counts them) of a run.

  `before(step, state)` ahead of a step's dispatch, `after(step, state, compiled_text)` once it is dispatched
  (`compiled_text()` returns the step's compiled module as text, for the op names); the window's edges wait for
  the device, so the trace holds whole steps and no neighbour's tail. `close()` ends a trace a stopped run left
  open. Every process traces its own host and devices. A run resumed past `start` traces nothing.
  """

  def __init__(self, logdir: Path, start: int, count: int):
    self.logdir, self.start, self.last, self.tracing = Path(logdir), start, start + count - 1, False
    if jax.process_count() > 1:  # the trace files are named by host, which processes on one machine share
      self.logdir = self.logdir / f"process_{jax.process_index()}"

  def before(self, step: int, state) -> None:
    if self.start and step == self.start:
      jax.block_until_ready(state)
      self.logdir.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.logdir), create_perfetto_trace=True)
      self.tracing = True

  def after(self, step: int, state, compiled_text) -> Path | None:
    """At the window's last step: stops the trace, writes summary.txt beside it and returns its path."""
    if not (self.tracing and step == self.last):
      return None
    jax.block_until_ready(state)
    self.close()
    run = max((p for p in (self.logdir / "plugins" / "profile").iterdir() if p.is_dir()), key=lambda p: p.name)
    module, op_names = hlo_op_names(compiled_text())
    times = {}
    for xplane in run.glob("*.xplane.pb"):
      times.update(traced_op_times(xplane, module))
    title = f"steps {self.start}-{self.last} of {module}, traced in {run}"
    (run / "summary.txt").write_text(summary_text(times, op_names, self.last - self.start + 1, title))
    return run / "summary.txt"

  def close(self) -> None:
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False
