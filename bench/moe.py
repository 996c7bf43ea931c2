"""One Mixtral MoE layer (models/moe.py): the grouped (ragged_dot), blocked and dense dispatches, the previous
blocked dispatch that gathered each block's expert weights ('gathered', kept here only as a yardstick),
transformers' MixtralSparseMoeBlock on the same weights, and each path's FLOP/s against the machine's f32 matmul
roof, all measured in the same run.

Run:  flock /tmp/sphinx_heavy.lock python bench/moe.py [--quick] [--iters 2]
      [--dispatches grouped,blocked,gathered,dense]
Config M: D 1024, F 3584, 8 experts, top-2, 2048 tokens (batch 4 x 512), float32, matmuls at 'highest'.
--quick: a small smoke config (seconds).

Useful FLOPs of the layer (forward): 2*N*D*E (router) + 2*N*K*3*D*F (gate, up, down of the K chosen experts per
token); forward+backward counts 3x that. Every path's FLOP/s is reported on that useful-FLOP numerator, so a path
doing extra work (dense: E/K times the expert FLOPs; XLA's CPU ragged_dot: a masked matmul over all E experts'
weights; blocked, gathered: the padding rows) shows it as a lower fraction of the roof.
Roof: the best of an n^3 f32 GEMM by XLA and by torch (bench/roof.py), n = the config's `gemm`.
Timing (bench/timing.py): after one warm-up call each, all contenders run interleaved for --iters rounds and the
fastest round of each counts. '% roof (CPU s)' repeats the ratio on process CPU seconds (contender vs roof GEMM),
which other jobs on a shared box disturb less than wall time.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import linen as nn
from timing import fastest  # bench/ is the script's directory
from roof import gemms, roof as measured_roof

from sphinx_jax.models import moe

CONFIGS = {
    "M": dict(dim=1024, hidden=3584, experts=8, top_k=2, batch=4, seq=512, gemm=2048),
    "quick": dict(dim=128, hidden=256, experts=8, top_k=2, batch=2, seq=64, gemm=512),
}


def gathered_dispatch(x, weights, experts, gate, up, down, block=moe.BLOCK_ROWS):
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


moe.DISPATCH["gathered"] = gathered_dispatch  # a bench-only contender, reachable through the layer's dispatch name


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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--dispatches", default="grouped,blocked,gathered,dense")
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
  fns["torch fwd"] = lambda: block(tx)
  fns.update(gemms("float32", c["gemm"]))
  with torch.inference_mode():
    best = fastest(fns, args.iters)
  roof, roof_name = measured_roof(best, c["gemm"])
  flops = useful_flops(c)
  gemm = {k: 2 * c["gemm"] ** 3 / best[k][0] / 1e9 for k in ("xla GEMM", "torch GEMM")}
  print(f"roof {roof / 1e9:.1f} GFLOP/s ({roof_name} {c['gemm']}^3; xla {gemm['xla GEMM']:.1f}, torch "
        f"{gemm['torch GEMM']:.1f}); useful forward {flops / 1e9:.1f} GFLOP")
  # CPU-time efficiency: the same ratio on process CPU seconds, which a box shared with other jobs disturbs less.
  roof_cpu = 2 * c["gemm"] ** 3 / best[roof_name][1]
  print(f"{'contender':16s} {'ms':>9s} {'GFLOP/s':>8s} {'% roof':>7s} {'% roof (CPU s)':>15s} {'vs dense':>9s}")
  for name in [n for n in fns if "GEMM" not in n]:
    seconds, cpu = best[name]
    work = 3 * flops if name.endswith("fwd+bwd") else flops
    dense = best.get("dense" + name[name.index(" "):], (float("nan"),))[0]
    print(f"{name:16s} {seconds * 1e3:9.1f} {work / seconds / 1e9:8.1f} {work / seconds / roof:7.1%} "
          f"{work / cpu / roof_cpu:15.1%} {dense / seconds:8.2f}x")


if __name__ == "__main__":
  main()
