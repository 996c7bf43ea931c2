"""LLaMA decoder: JAX train step and KV-cached greedy decoding vs transformers.LlamaForCausalLM (+ torch AdamW,
`generate`) on the same config, with the machine's f32 matmul roof and streaming bandwidth measured in the run.

Run:  flock /tmp/sphinx_heavy.lock python bench/decoder.py [--quick] [--iters 3] [--parts train,decode]
          [--isolate] [--no-torch-compile] [--remat none|full|...] [--variants fused:rows:custom,lse:plain:autodiff]
          [--layers scanned,unscanned]
Config M: vocab 32000, dim 1024, 8 layers, 16 heads (MHA), FFN 2816, seq 512, batch 4, float32.
Decode: prompt 128 tokens, 128 new tokens, batch 1 and 8: `inference/generate.py` `Generator.generate_ids` on a
text-only SPHINX (towers=()) holding the HF model's weights (through convert/hf.py), scanned and unscanned
layers (`unscan_layers`), unscanned with XLA CPU's default fusions (without the Generator's CPU-only
`CPU_COMPILER_OPTIONS`), and unscanned with the previous single-query attention (dots against the KV cache instead
of `layers._cached_logits` / `_cached_values`), vs HF `generate` (default, and static cache + torch.compile unless
--no-torch-compile).
--quick: a small smoke config (seconds). JAX train-step variants (--variants CE:DENSE:ATTENTION): the
cross-entropy ('fused' = models/head_loss.py, 'lse' / 'plain' on full logits), and the previous dense products
and attention backward (kept here so that each change is measured against what it replaced in the same run).

Model FLOPs per train step (the MFU numerator): 6 * P_mm * B * T + 6 * L * B * T^2 * D, with P_mm the matmul
parameters (blocks + lm_head, not the embedding lookup) and the second term causal attention (QK^T and PV,
half the square). Roof: the best of jnp.dot (jit, precision 'highest') and torch.mm on n x n x n f32 GEMMs.
Bandwidth: the best of numpy, torch and XLA copies of a 256 MiB f32 array (bytes read + written).
Decode bound: bandwidth / bytes read per step (all matmul weights once + every row's KV cache at the mean length)
x batch tokens/s; the decode rounds time the stream copies again, and the bound uses the best bandwidth seen.
Two rates per contender: end to end (new tokens / the whole call, the prompt's prefill included, what a user
waits for) and per step (batch * (new - 1) / (t(new tokens) - t(1 new token)): the single-token steps alone, the
bandwidth-bound part that the bound describes; the prefill is a compute-bound [prompt, D] pass). JAX's two calls run
one compiled program (one length bucket for prompt and new tokens), only the loop's limit differs.
Timing (bench/timing.py): after one warm-up call each (its time, mostly compilation, is printed), the contenders
of a part run interleaved for --iters rounds and the fastest round of each counts. --isolate (train part): each
contender runs its warm-up and rounds in a fresh process of this script instead, beside the roof GEMMs, because
PyTorch's train steps slow a later JAX step in the same process (`time_in_own_process`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from roof import gemms
from timing import fastest, warm_up  # bench/ is the script's directory

from sphinx_jax import host_memory
from sphinx_jax import config as cfg
from sphinx_jax.convert import hf as hf_convert
from sphinx_jax.inference import generate
from sphinx_jax.models import head_loss, layers
from sphinx_jax.models.llama import Llama
from sphinx_jax.models.sphinx import Sphinx

RESULT = "RESULT "  # the line on which an --only child hands its numbers back
CONFIGS = {
    "M": dict(vocab=32000, dim=1024, layers=8, heads=16, ffn=2816, seq=512, batch=4, prompt=128, new=128,
              decode_batches=(1, 8), gemm=(2048, 4096)),
    "quick": dict(vocab=2048, dim=256, layers=2, heads=4, ffn=704, seq=128, batch=2, prompt=32, new=16,
                  decode_batches=(1, 2), gemm=(1024,)),
}


# --- machine ----------------------------------------------------------------------------------------------

def matmul_roof(sizes, iters):
  """Best f32 GEMM FLOP/s of XLA and PyTorch (bench/roof.py) over square sizes; returns (roof, {name: flops},
  roof per CPU second: the same GEMMs' FLOPs over this process's CPU time, less disturbed by other jobs)."""
  results, per_cpu = {}, 0.0
  for n in sizes:
    best = fastest(gemms("float32", n), iters)
    results.update({f"{name.split()[0]} {n}": 2 * n ** 3 / best[name][0] for name in best})
    per_cpu = max([per_cpu] + [2 * n ** 3 / cpu for _, cpu in best.values()])
  return max(results.values()), results, per_cpu


def stream_contenders(mib=256) -> dict[str, tuple[Callable, int]]:
  """Streaming kernels with the bytes each moves: copies (read + write, numpy and torch) and reductions (read
  only, torch and XLA, multi-threaded), so the decode bound uses what this machine can actually stream."""
  n = mib * 2 ** 20 // 4
  src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
  ts, td = torch.ones(n), torch.empty(n)
  x = jnp.ones(n, jnp.float32)
  total = jax.jit(jnp.sum)
  return {"numpy copy": (lambda: np.copyto(dst, src), 2 * src.nbytes),
          "torch copy": (lambda: td.copy_(ts), 2 * src.nbytes),
          "torch sum": (lambda: ts.sum(), src.nbytes),
          "xla sum": (lambda: total(x).block_until_ready(), src.nbytes)}


def stream_bandwidth(iters, mib=256):
  """Best streaming bandwidth in bytes/s over `stream_contenders`; returns (best, {name: bytes/s})."""
  contenders = stream_contenders(mib)
  best = fastest({name: fn for name, (fn, _) in contenders.items()}, iters)
  results = {name: size / best[name][0] for name, (_, size) in contenders.items()}
  return max(results.values()), results


# --- models -----------------------------------------------------------------------------------------------

def llm_of(c, **overrides):
  return cfg.llm_config(vocab_size=c["vocab"], dim=c["dim"], n_layers=c["layers"], n_heads=c["heads"],
                        n_kv_heads=c["heads"], hidden_dim=c["ffn"], max_seq_len=2 * c["seq"], **overrides)


def hf_model(c):
  config = transformers.LlamaConfig(
      vocab_size=c["vocab"], hidden_size=c["dim"], intermediate_size=c["ffn"], num_hidden_layers=c["layers"],
      num_attention_heads=c["heads"], num_key_value_heads=c["heads"], max_position_embeddings=2 * c["seq"],
      rms_norm_eps=1e-5, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
  model.generation_config.eos_token_id = None  # every run generates exactly `new` tokens
  model.generation_config.pad_token_id = 0
  return model


def matmul_params(c):
  d, f = c["dim"], c["ffn"]
  return c["layers"] * (4 * d * d + 3 * d * f) + d * c["vocab"]


def train_flops(c):
  b, t = c["batch"], c["seq"]
  return 6 * matmul_params(c) * b * t + 6 * c["layers"] * b * t * t * c["dim"]


# --- train step -------------------------------------------------------------------------------------------

def cross_entropy(logits, targets, kind):
  """Mean token cross-entropy. 'plain': log_softmax then gather; 'lse': logsumexp - target logit (no [B,T,V]
  log-probabilities materialised)."""
  logits = logits.astype(jnp.float32)
  if kind == "plain":
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return (jax.nn.logsumexp(logits, axis=-1) - target_logit).mean()


@contextlib.contextmanager
def previous_layers(dense, attention):
  """dense 'rows': layers.dense as it is (products on [B*T, D] rows), 'plain': the previous [B, T, D] products;
  attention 'custom': layers._attend's backward as it is, 'autodiff': the previous one. The previous versions are
  kept here to measure each change in the same run; they hold while a step traces."""
  saved = layers.rows_dot_general, layers._attend
  if dense == "plain":
    layers.rows_dot_general = jax.lax.dot_general
  if attention == "autodiff":
    layers._attend = saved[1].fun  # the same forward, differentiated by autodiff through the softmax
  try:
    yield
  finally:
    layers.rows_dot_general, layers._attend = saved


def jax_train_step(c, remat, ce, dense="rows", attention="custom", chunk_rows=1024, scan=True):
  """A ready-to-time JAX train step (fwd + bwd + AdamW, state donated) on config c, compiled here, inside
  `previous_layers(dense, attention)`. ce 'fused': the decoder returns its final hidden states and
  models/head_loss.py applies lm_head and the cross-entropy in chunks of `chunk_rows` rows. scan: the decoder's
  layers as one scanned block (stacked weights) or unrolled."""
  model = Llama(llm_of(c, remat_policy=remat, scan_layers=scan))
  b, t = c["batch"], c["seq"]
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, c["vocab"], (b, t + 1)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  params = jax.jit(lambda: model.init(jax.random.key(0), tokens[:, :t], positions=positions))()["params"]
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                        is_leaf=lambda x: hasattr(x, "unbox"))
  tx = optax.adamw(1e-4, weight_decay=0.1)
  state = (params, tx.init(params))

  def loss_fn(p, toks):
    if ce == "fused":
      hidden, _ = model.apply({"params": p}, toks[:, :-1], positions=positions, return_hidden=True)
      nll, _ = head_loss.head_cross_entropy(hidden, p["lm_head"]["kernel"], toks[:, 1:], jnp.ones((b, t)),
                                            chunk_rows=chunk_rows)
      return nll / (b * t)
    logits, _ = model.apply({"params": p}, toks[:, :-1], positions=positions)
    return cross_entropy(logits, toks[:, 1:], ce)

  def step(state, toks):
    p, opt = state
    loss, grads = jax.value_and_grad(loss_fn)(p, toks)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  start = time.perf_counter()
  with previous_layers(dense, attention):
    compiled = jax.jit(step, donate_argnums=0).lower(state, tokens).compile()
  print(f"    (compiled the jax step {ce}:{dense}:{attention} in {time.perf_counter() - start:.1f} s)", flush=True)

  def run():
    nonlocal state
    state, loss = compiled(state, tokens)
    loss.block_until_ready()

  return run


def torch_train_step(c, tuned):
  """A ready-to-time PyTorch step: as a user gets it, or tuned (fused AdamW, torch.compile)."""
  torch.manual_seed(0)
  model = hf_model(c).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=tuned or None)
  forward = torch.compile(model) if tuned else model
  tokens = torch.randint(0, c["vocab"], (c["batch"], c["seq"] + 1))

  def run():
    # Same work as the JAX step: T inputs, T shifted targets.
    logits = forward(tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return run


# --- decoding ---------------------------------------------------------------------------------------------

def hf_decoder(c, tuned):
  """The HF model of every decode run (seed 0); tuned: static KV cache and a torch.compile'd forward."""
  torch.manual_seed(0)
  model = hf_model(c).eval()
  if tuned:
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward)
  return model


def jax_generator(c, model, unscan_layers):
  """A Generator on a text-only SPHINX holding `model`'s weights (the path of `convert --from hf`), with one length
  bucket that holds the prompt and every new-token count (so 1 and c["new"] new tokens run the same program)."""
  llm = hf_convert.llm_config_from_hf(model.config.to_dict())
  params = hf_convert.params_from_hf({k: v.numpy() for k, v in model.state_dict().items()}, llm, True)
  sphinx = Sphinx(cfg.model_config(llm, (), 0, 1, dtype="float32"))
  return generate.Generator(sphinx, {"llm": jax.device_put(params)}, unscan_layers=unscan_layers,
                            buckets=(max(c["prompt"], c["new"]),))


@contextlib.contextmanager
def xla_default_cpu_options():
  """Generators built in this block compile with XLA CPU's default options, not `generate.CPU_COMPILER_OPTIONS`
  (the previous state), so that CPU-only setting is measured in the same run."""
  saved = generate.CPU_COMPILER_OPTIONS
  generate.CPU_COMPILER_OPTIONS = {}
  try:
    yield
  finally:
    generate.CPU_COMPILER_OPTIONS = saved


@contextlib.contextmanager
def dot_attention():
  """A decode step attends to the KV cache with dots, the previous way (the prefill's einsum and `layers._attend`),
  instead of `layers._cached_logits` / `_cached_values`; it holds while a Generator traces, so that change is
  measured in the same run."""
  saved = layers._cached_logits, layers._cached_values
  layers._cached_logits = lambda qg, k: jnp.einsum("BKGTH,BKHS->BKGTS", qg, k, preferred_element_type=jnp.float32)
  layers._cached_values = lambda logits, v: layers._attend(logits, v, "BKSH", "BKGTH")
  try:
    yield
  finally:
    layers._cached_logits, layers._cached_values = saved


ONE_NEW = " [1 new token]"  # suffix of the contender that generates a single token (the prefill's time)


def decode_contenders(c, batch, hf_models, generators, outputs, traced_in=None):
  """name -> a call generating c["new"] greedy tokens for `batch` prompts, leaving its ids in outputs[name], and
  name + ONE_NEW -> the same call for one new token. traced_in: {name: context manager factory} that holds
  around that generator's calls (its tracing among them)."""
  traced_in = traced_in or {}
  prompt = np.random.default_rng(1).integers(0, c["vocab"], (batch, c["prompt"]))
  torch_prompt = torch.from_numpy(prompt)

  def hf_run(name, model, new):
    def run():
      with torch.inference_mode():
        out = model.generate(torch_prompt, max_new_tokens=new, do_sample=False,
                             attention_mask=torch.ones_like(torch_prompt))
      outputs[name] = out[:, c["prompt"]:].numpy()
    return run

  def jax_run(name, generator, new):
    def run():
      with traced_in.get(name.removesuffix(ONE_NEW), contextlib.nullcontext)():
        outputs[name] = np.array(generator.generate_ids(prompt.tolist(), max_new_tokens=new))
    return run

  runs = {}
  for new, suffix in ((c["new"], ""), (1, ONE_NEW)):
    runs.update({name + suffix: hf_run(name + suffix, m, new) for name, m in hf_models.items()})
    runs.update({name + suffix: jax_run(name + suffix, g, new) for name, g in generators.items()})
  return runs


def decode_bytes_per_step(c, batch):
  """Weights read once per step (shared by the batch) + each row's KV cache at the mean length, f32."""
  cache = 2 * c["layers"] * (c["prompt"] + c["new"] / 2) * c["dim"] * batch
  return 4 * (matmul_params(c) + cache)


# --- report -----------------------------------------------------------------------------------------------

def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--parts", default="train,decode")
  parser.add_argument("--no-torch-compile", action="store_true")
  parser.add_argument("--remat", default="none")
  parser.add_argument("--variants", default="fused:rows:custom",
                      help="JAX steps to time, comma-separated CE:DENSE:ATTENTION; CE plain|lse|fused, DENSE rows "
                           "(now)|plain (previous), ATTENTION custom (now)|autodiff (previous)")
  parser.add_argument("--chunk-rows", type=int, default=1024, help="rows per chunk of the fused cross-entropy")
  parser.add_argument("--layers", default="scanned,unscanned",
                      help="JAX steps' decoder layers, comma-separated: scanned (stacked weights, nn.scan) | unscanned")
  parser.add_argument("--isolate", action="store_true",
                      help="train part: time each contender in its own process (no interleaving across runtimes)")
  parser.add_argument("--only", help=argparse.SUPPRESS)  # set by --isolate for its child processes
  args = parser.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = False
  c = CONFIGS["quick" if args.quick else "M"]
  parts = args.parts.split(",")
  print(f"config {'quick' if args.quick else 'M'}: {c}; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} threads {torch.get_num_threads()}")

  roof, gemms, roof_cpu = matmul_roof(c["gemm"], args.iters)
  bandwidth, copies = stream_bandwidth(args.iters)
  print("f32 GEMM GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in gemms.items())
        + f"  -> roof {roof / 1e9:.1f} ({roof_cpu / 1e9:.1f} per CPU second)", flush=True)
  print("stream GB/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in copies.items())
        + f"  -> bandwidth {bandwidth / 1e9:.1f}")

  if "train" in parts:
    train_part(c, args, roof, roof_cpu)
  if "decode" in parts:
    decode_part(c, args, bandwidth)


def warm_up_verbosely(runs) -> dict[str, float]:
  """`warm_up` one at a time, printing each first-call time as it ends (torch.compile may take minutes). A
  contender whose first call raises is reported and removed from `runs`, so one broken compiler path does not
  lose the whole run's numbers."""
  first = {}
  for name, fn in list(runs.items()):
    try:
      first.update(warm_up({name: fn}))
    except Exception as e:  # noqa: BLE001 (printed, and the contender leaves the table)
      print(f"    DROPPED {name}: its first call raised {type(e).__name__}: {str(e)[:300]}", flush=True)
      del runs[name]
      continue
    print(f"    (first call of {name}: {first[name]:.1f} s)", flush=True)
  return first


def train_builders(c, args) -> dict[str, Callable[[], Callable]]:
  """Contender name -> a function that builds its ready-to-time train step (each holds a model and its optimizer
  state, so only the contenders a process times are built)."""
  builders = {"torch default (AdamW foreach)": functools.partial(torch_train_step, c, tuned=False)}
  if not args.no_torch_compile:
    builders["torch tuned (fused AdamW, torch.compile)"] = functools.partial(torch_train_step, c, tuned=True)
  for remat in dict.fromkeys([args.remat, "none"]):
    for variant in args.variants.split(","):
      ce, dense, attention = variant.split(":")
      for layers in args.layers.split(","):
        builders[f"jax remat={remat} {variant} {layers}"] = functools.partial(
            jax_train_step, c, remat, ce, dense, attention, args.chunk_rows, scan=layers == "scanned")
  return builders


def time_train_steps(c, args, runs) -> dict[str, dict]:
  """Warm-up, then --iters interleaved rounds of `runs` and of the roof GEMMs -> per contender: fastest wall and
  CPU seconds, first-call seconds, and the roof (and roof per CPU second) seen by this process's rounds."""
  first = warm_up_verbosely(runs)
  # The roof GEMMs run in the same rounds too, so that load from other jobs that comes and goes falls on them alike.
  n = max(c["gemm"])
  roof_runs = {f"roof {name}": fn for name, fn in gemms("float32", n).items()}
  warm_up(roof_runs)
  best = fastest({**runs, **roof_runs}, args.iters, warm=False)
  roof = max(2 * n ** 3 / best[name][0] for name in roof_runs)
  roof_cpu = max(2 * n ** 3 / best[name][1] for name in roof_runs)
  return {name: dict(wall=best[name][0], cpu=best[name][1], first=first[name], roof=roof, roof_cpu=roof_cpu)
          for name in runs}


def time_in_own_process(name, args) -> dict:
  """One contender timed by a fresh process of this script (--only NAME): after eager PyTorch train steps have
  run in a process, the JAX step there ran ~20% slower (11.7 -> 14.1 s at config M on a quiet box, even with
  torch at one thread and seconds of sleep in between; cause not found), so interleaving in one process
  penalises whichever runtime comes second."""
  argv = [sys.executable, __file__, "--parts", "train", "--only", name, "--iters", str(args.iters), "--remat",
          args.remat, "--variants", args.variants, "--chunk-rows", str(args.chunk_rows), "--layers", args.layers]
  argv += ["--quick"] * args.quick + ["--no-torch-compile"] * args.no_torch_compile
  out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
  print("".join(f"    [{name}] {line}\n" for line in out.splitlines() if line.startswith("    (")), end="", flush=True)
  return json.loads(next(line for line in out.splitlines() if line.startswith(RESULT))[len(RESULT):])


def train_part(c, args, roof, roof_cpu):
  flops = train_flops(c)
  print(f"train step: {flops / 1e12:.3f} TFLOP of model work", flush=True)
  builders = train_builders(c, args)
  if args.only:  # a child of --isolate: time one contender, hand the numbers back
    print(RESULT + json.dumps(time_train_steps(c, args, {args.only: builders[args.only]()})[args.only]), flush=True)
    return
  if args.isolate:
    results = {name: time_in_own_process(name, args) for name in builders}
  else:
    results = time_train_steps(c, args, {name: build() for name, build in builders.items()})
  roof = max([roof] + [r["roof"] for r in results.values()])
  roof_cpu = max([roof_cpu] + [r["roof_cpu"] for r in results.values()])
  print(f"  roof over the start and these rounds: {roof / 1e9:.1f} GFLOP/s ({roof_cpu / 1e9:.1f} per CPU second)"
        + ("; each contender timed in its own process" if args.isolate else ""))
  best_torch = min(r["wall"] for name, r in results.items() if name.startswith("torch"))
  for name, r in results.items():
    seconds, cpu = r["wall"], r["cpu"]
    print(f"  {name:44s} {seconds:7.2f} s/step (CPU {cpu:7.2f} s, first call {r['first']:6.1f} s)  "
          f"{flops / seconds / 1e9:7.1f} GFLOP/s  {flops / seconds / roof:6.1%} of roof "
          f"({flops / cpu / roof_cpu:6.1%} in CPU s)  x{best_torch / seconds:.2f} vs best torch", flush=True)


def decode_part(c, args, bandwidth):
  print(f"decode: prompt {c['prompt']}, {c['new']} new tokens, greedy (tokens/s)", flush=True)
  hf_models = {"hf generate": hf_decoder(c, tuned=False)}
  if not args.no_torch_compile:
    hf_models["hf generate static cache + compile"] = hf_decoder(c, tuned=True)
  reference = hf_models["hf generate"]
  generators = {"jax Generator scanned layers": jax_generator(c, reference, unscan_layers=False),
                "jax Generator unscanned layers": jax_generator(c, reference, unscan_layers=True)}
  with xla_default_cpu_options():
    generators["jax unscanned, XLA CPU default options"] = jax_generator(c, reference, unscan_layers=True)
  previous_attention = "jax unscanned, attention as dots"
  generators[previous_attention] = jax_generator(c, reference, unscan_layers=True)
  streams = stream_contenders()
  warm_up({name: fn for name, (fn, _) in streams.items()})
  for batch in c["decode_batches"]:
    outputs = {}
    runs = decode_contenders(c, batch, hf_models, generators, outputs, {previous_attention: dot_attention})
    first = warm_up_verbosely(runs)
    best = fastest({**runs, **{name: fn for name, (fn, _) in streams.items()}}, args.iters, warm=False)
    seen = max([bandwidth] + [size / best[name][0] for name, (_, size) in streams.items()])
    bound = seen / decode_bytes_per_step(c, batch) * batch
    names = [name for name in runs if name + ONE_NEW in runs]  # both calls survived their warm-up
    rates = {name: batch * c["new"] / best[name][0] for name in names}
    steps = {name: batch * (c["new"] - 1) / (best[name][0] - best[name + ONE_NEW][0]) for name in names}
    best_hf = max(rate for name, rate in rates.items() if name.startswith("hf"))
    best_hf_step = max(rate for name, rate in steps.items() if name.startswith("hf"))
    print(f"  batch {batch}: bandwidth {seen / 1e9:.1f} GB/s, {decode_bytes_per_step(c, batch) / 1e6:.0f} MB read "
          f"per step -> bound {bound:.1f} tok/s", flush=True)
    for name in names:
      same = np.mean(outputs[name] == outputs["hf generate"])
      print(f"    {name:38s} end to end {rates[name]:6.1f} tok/s  x{rates[name] / best_hf:.2f} vs best HF  "
            f"{rates[name] / bound:6.1%} of the bound | per step {steps[name]:6.1f} tok/s  "
            f"x{steps[name] / best_hf_step:.2f}  {steps[name] / bound:6.1%} (prefill + 1 token "
            f"{best[name + ONE_NEW][0]:.2f} s; first call {first[name]:6.1f} s; {same:.0%} of tokens as HF)",
            flush=True)


if __name__ == "__main__":
  host_memory.restart_with_allocator()  # the allocator the sphinx-jax program runs with
  main()
