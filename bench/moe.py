"""One Mixtral MoE layer (models/moe.py): the grouped (ragged_dot), blocked and dense dispatches, two earlier
blocked dispatches kept here only as yardsticks ('padded256': every expert's group padded to 256-row blocks;
'gathered': the same layout with each block's expert weights gathered), transformers' MixtralSparseMoeBlock on the
same weights (forward, and forward+backward), and each path's FLOP/s against the machine's f32 matmul roof, all
measured in the same run.

Run:  flock /tmp/sphinx_heavy.lock python bench/moe.py [--quick] [--iters 2] [--threads]
      [--dispatches grouped,blocked,padded256,gathered,dense]
Config M: D 1024, F 3584, 8 experts, top-2, 2048 tokens (batch 4 x 512), float32, matmuls at 'highest'.
--quick: a small smoke config (seconds).

Useful FLOPs of the layer (forward): 2*N*D*E (router) + 2*N*K*3*D*F (gate, up, down of the K chosen experts per
token); forward+backward counts 3x that. Every path's FLOP/s is reported on that useful-FLOP numerator, so a path
doing extra work (dense: E/K times the expert FLOPs; XLA's CPU ragged_dot: a masked matmul over all E experts'
weights; blocked, padded256, gathered: the padding rows) shows it as a lower fraction of the roof.
Roof: the best of an n^3 f32 GEMM by XLA and by torch (bench/roof.py), n = the config's `gemm`.
Timing (bench/timing.py): after one warm-up call each, all contenders run interleaved for --iters rounds and the
fastest round of each counts. '% roof (CPU s)' repeats the ratio on process CPU seconds (contender vs roof GEMM),
which other jobs on a shared box disturb less than wall time. --threads adds, per contender, the mean number of
this process's threads that are runnable during one more call (`runnable_threads`): the parallelism it asks for,
which other load does not change (a runnable thread waiting for a core still counts; so does a spinning one).
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import linen as nn
from timing import fastest  # bench/ is the script's directory
from roof import gemms, roof as measured_roof

from sphinx_jax import host_memory
from sphinx_jax.models import moe

CONFIGS = {
    "M": dict(dim=1024, hidden=3584, experts=8, top_k=2, batch=4, seq=512, gemm=2048),
    "quick": dict(dim=128, hidden=256, experts=8, top_k=2, batch=2, seq=64, gemm=512),
}


def gathered_dispatch(x, weights, experts, gate, up, down, block=256):
  """The 'blocked' dispatch before it read weights in place: the same padded layout, but every block's expert
  weights gathered into [blocks, D, F] stacks and one batched matmul per projection."""
  n, k = experts.shape
  e = gate.shape[0]
  rows, counts = moe.padded_layout(experts.reshape(-1), e, block)
  blocks = -(-n * k // block) + e
  xb = jnp.zeros((blocks * block, x.shape[-1]), x.dtype).at[rows].set(jnp.repeat(x, k, axis=0))
  xb = xb.reshape(blocks, block, -1)
  owner = jnp.minimum(jnp.searchsorted(jnp.cumsum(counts), jnp.arange(blocks), side="right"), e - 1)
  h = jax.nn.silu(jnp.einsum("BRD,BDF->BRF", xb, gate[owner])) * jnp.einsum("BRD,BDF->BRF", xb, up[owner])
  yb = jnp.einsum("BRF,BFD->BRD", h, down[owner]).reshape(blocks * block, -1)
  return jnp.einsum("NKD,NK->ND", yb[rows].reshape(n, k, -1), weights)


# Bench-only contenders, reachable through the layer's dispatch name. 'padded256' is the 'blocked' dispatch before
# chunk plans: block == granule makes every group one size of chunk, padded to a multiple of 256 rows.
moe.DISPATCH["gathered"] = gathered_dispatch
moe.DISPATCH["padded256"] = functools.partial(moe.blocked_dispatch, block=256, granule=256)


def runnable_threads(fn, period: float = 5e-4) -> float:
  """Mean number of this process's threads in state R (running or waiting for a core) while fn runs once, sampled
  every `period` seconds from /proc by a thread that leaves itself out."""
  counts, done = collections.Counter(), threading.Event()

  def sample():
    me = str(threading.get_native_id())
    while not done.is_set():
      states = []
      for tid in os.listdir("/proc/self/task"):
        try:
          with open(f"/proc/self/task/{tid}/stat") as f:
            states.append(tid != me and f.read().rsplit(")", 1)[1].split()[0] == "R")
        except FileNotFoundError:  # the thread ended between listdir and open
          pass
      counts[sum(states)] += 1
      time.sleep(period)
  sampler = threading.Thread(target=sample)
  sampler.start()
  fn()
  done.set()
  sampler.join()
  return sum(k * v for k, v in counts.items()) / max(1, sum(counts.values()))


def useful_flops(c):
  n = c["batch"] * c["seq"]
  return 2 * n * c["dim"] * c["experts"] + 2 * n * c["top_k"] * 3 * c["dim"] * c["hidden"]


def layer_of(c, dispatch):
  return moe.MoeFeedForward(c["experts"], c["top_k"], c["hidden"], dispatch)


def jax_contenders(c, params, x, dispatch):
  """{'<dispatch> fwd': forward, '<dispatch> fwd+bwd': gradients wrt params and input} of the jitted layer."""
  layer = layer_of(c, dispatch)
  forward = jax.jit(lambda p, inputs: layer.apply({"params": p}, inputs))
  grad = jax.jit(jax.grad(lambda p, inputs: jnp.sum(layer.apply({"params": p}, inputs) ** 2), argnums=(0, 1)))
  return {f"{dispatch} fwd": lambda: forward(params, x).block_until_ready(),
          f"{dispatch} fwd+bwd": lambda: jax.block_until_ready(grad(params, x))}


def torch_block(c, params):
  """transformers 4.57 MixtralSparseMoeBlock (loops over experts, index_add) holding our weights."""
  config = transformers.MixtralConfig(hidden_size=c["dim"], intermediate_size=c["hidden"],
                                      num_local_experts=c["experts"], num_experts_per_tok=c["top_k"])
  block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config).eval()
  with torch.no_grad():
    block.gate.weight.copy_(torch.from_numpy(np.array(params["router"]["kernel"]).T))
    for e, expert in enumerate(block.experts):
      expert.w1.weight.copy_(torch.from_numpy(np.array(params["gate"][e]).T))
      expert.w3.weight.copy_(torch.from_numpy(np.array(params["up"][e]).T))
      expert.w2.weight.copy_(torch.from_numpy(np.array(params["down"][e]).T))
  return block


def torch_contenders(block, tx):
  """{'torch fwd': inference, 'torch fwd+bwd': gradients of sum(y^2) wrt every weight and the input}."""
  def forward():
    with torch.inference_mode():
      block(tx)

  def forward_backward():
    inputs = tx.clone().requires_grad_()
    block.zero_grad(set_to_none=True)
    (block(inputs)[0] ** 2).sum().backward()
  return {"torch fwd": forward, "torch fwd+bwd": forward_backward}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--dispatches", default="grouped,blocked,padded256,gathered,dense")
  parser.add_argument("--threads", action="store_true", help="also sample each contender's runnable threads")
  args = parser.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  c = CONFIGS["quick" if args.quick else "M"]
  dispatches = args.dispatches.split(",")
  print(f"device {jax.devices()[0].device_kind}, torch threads {torch.get_num_threads()}, config {c}", flush=True)

  x = jax.random.normal(jax.random.key(0), (c["batch"], c["seq"], c["dim"]), jnp.float32)
  params = nn.meta.unbox(layer_of(c, "dense").init(jax.random.key(1), x))["params"]
  block, tx = torch_block(c, params), torch.from_numpy(np.array(x))
  with torch.no_grad():
    reference = block(tx)[0].numpy()
  for d in dispatches:  # every path computes the same layer as transformers before it is timed
    diff = np.abs(np.asarray(layer_of(c, d).apply({"params": params}, x)) - reference).max()
    print(f"{d}: max |ours - MixtralSparseMoeBlock| = {diff:.1e}", flush=True)

  fns = {name: fn for d in dispatches for name, fn in jax_contenders(c, params, x, d).items()}
  fns.update(torch_contenders(block, tx))
  fns.update(gemms("float32", c["gemm"]))
  best = fastest(fns, args.iters)
  threads = {name: runnable_threads(fn) for name, fn in fns.items()} if args.threads else {}
  roof, roof_name = measured_roof(best, c["gemm"])
  flops = useful_flops(c)
  gemm = {k: 2 * c["gemm"] ** 3 / best[k][0] / 1e9 for k in ("xla GEMM", "torch GEMM")}
  print(f"roof {roof / 1e9:.1f} GFLOP/s ({roof_name} {c['gemm']}^3; xla {gemm['xla GEMM']:.1f}, torch "
        f"{gemm['torch GEMM']:.1f}); useful forward {flops / 1e9:.1f} GFLOP")
  # CPU-time efficiency: the same ratio on process CPU seconds, which a box shared with other jobs disturbs less.
  roof_cpu = 2 * c["gemm"] ** 3 / best[roof_name][1]
  print(f"{'contender':18s} {'ms':>9s} {'GFLOP/s':>8s} {'% roof':>7s} {'% roof (CPU s)':>15s} {'vs dense':>9s} "
        f"{'vs torch':>9s}" + (f" {'threads':>8s}" if threads else ""))
  for name in fns:
    seconds, cpu = best[name]
    work = 2 * c["gemm"] ** 3 if "GEMM" in name else 3 * flops if name.endswith("fwd+bwd") else flops
    kind = name[name.index(" "):]
    ratios = [f"{best[who + kind][0] / seconds:8.2f}x" if who + kind in best and "GEMM" not in name else f"{'-':>9s}"
              for who in ("dense", "torch")]
    print(f"{name:18s} {seconds * 1e3:9.1f} {work / seconds / 1e9:8.1f} {work / seconds / roof:7.1%} "
          f"{work / cpu / roof_cpu:15.1%} {' '.join(ratios)}" + (f" {threads[name]:8.2f}" if threads else ""))


if __name__ == "__main__":
  host_memory.restart_with_allocator()  # the allocator the sphinx-jax program runs with
  main()
