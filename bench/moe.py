"""One Mixtral MoE layer (models/moe.py): grouped vs dense dispatch, vs transformers' MixtralSparseMoeBlock on the
same weights, and the grouped path's FLOP/s against the machine's f32 matmul roof measured in the same run.

Run:  flock /tmp/sphinx_heavy.lock python bench/moe.py [--quick] [--iters 3]
Config M: D 1024, F 3584, 8 experts, top-2, 2048 tokens (batch 4 x 512), float32, matmuls at 'highest'.
--quick: a small smoke config (seconds).

Useful FLOPs of the layer (forward): 2*N*D*E (router) + 2*N*K*3*D*F (gate, up, down of the K chosen experts per
token); forward+backward counts 3x that. Dense dispatch runs all E experts (E/K times the expert FLOPs), so its
FLOP/s is reported on the same useful-FLOP numerator: the ratio to grouped is the speed-up, not an efficiency.
Roof: bench/decoder.py's `matmul_roof` (best of jnp.dot and torch.mm on square f32 GEMMs).
Timings are the best of --iters runs after a warm-up (others share this machine).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from decoder import best_time, matmul_roof  # bench/ is the script's directory
from flax import linen as nn

from sphinx_jax.models import moe

CONFIGS = {
    "M": dict(dim=1024, hidden=3584, experts=8, top_k=2, batch=4, seq=512, gemm=(2048, 4096)),
    "quick": dict(dim=128, hidden=256, experts=8, top_k=2, batch=2, seq=64, gemm=(512,)),
}


def useful_flops(c):
  n = c["batch"] * c["seq"]
  return 2 * n * c["dim"] * c["experts"] + 2 * n * c["top_k"] * 3 * c["dim"] * c["hidden"]


def jax_times(c, params, x, dispatch, iters):
  """(forward seconds, forward+backward seconds) of the jitted layer."""
  layer = moe.MoeFeedForward(c["experts"], c["top_k"], c["hidden"], dispatch)
  forward = jax.jit(lambda p, inputs: layer.apply({"params": p}, inputs))
  grad = jax.jit(jax.grad(lambda p, inputs: jnp.sum(layer.apply({"params": p}, inputs) ** 2), argnums=(0, 1)))
  fwd = best_time(lambda: forward(params, x).block_until_ready(), iters)
  bwd = best_time(lambda: jax.block_until_ready(grad(params, x)), iters)
  return fwd, bwd


def torch_forward_time(c, params, x, iters):
  """transformers 4.57 MixtralSparseMoeBlock (loops over experts, index_add) with our weights; its output is
  checked against ours so both run the same computation."""
  config = transformers.MixtralConfig(hidden_size=c["dim"], intermediate_size=c["hidden"],
                                      num_local_experts=c["experts"], num_experts_per_tok=c["top_k"])
  block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config).eval()
  with torch.no_grad():
    block.gate.weight.copy_(torch.from_numpy(np.array(params["router"]["kernel"]).T))
    for e, expert in enumerate(block.experts):
      expert.w1.weight.copy_(torch.from_numpy(np.array(params["gate"][e]).T))
      expert.w3.weight.copy_(torch.from_numpy(np.array(params["up"][e]).T))
      expert.w2.weight.copy_(torch.from_numpy(np.array(params["down"][e]).T))
  tx = torch.from_numpy(np.array(x))
  with torch.no_grad():
    out = block(tx)[0].numpy()
    seconds = best_time(lambda: block(tx), iters)
  return seconds, out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--iters", type=int, default=3)
  args = parser.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  c = CONFIGS["quick" if args.quick else "M"]
  print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}  config: {c}")

  roof, gemms = matmul_roof(c["gemm"], args.iters)
  print("f32 matmul roof: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in gemms.items()) + " GFLOP/s")

  x = jax.random.normal(jax.random.key(0), (c["batch"], c["seq"], c["dim"]), jnp.float32)
  layer = moe.MoeFeedForward(c["experts"], c["top_k"], c["hidden"], "grouped")
  params = nn.meta.unbox(layer.init(jax.random.key(1), x))["params"]
  flops = useful_flops(c)
  times = {d: jax_times(c, params, x, d, args.iters) for d in ("grouped", "dense")}
  for d, (fwd, bwd) in times.items():
    print(f"jax {d:8s} forward {fwd * 1e3:9.1f} ms  {flops / fwd / 1e9:7.1f} GFLOP/s ({flops / fwd / roof:.0%} "
          f"of roof) | fwd+bwd {bwd * 1e3:9.1f} ms  {3 * flops / bwd / 1e9:7.1f} GFLOP/s "
          f"({3 * flops / bwd / roof:.0%} of roof)")
  print(f"grouped vs dense: forward x{times['dense'][0] / times['grouped'][0]:.2f}, "
        f"fwd+bwd x{times['dense'][1] / times['grouped'][1]:.2f} faster")

  torch_seconds, torch_out = torch_forward_time(c, params, x, args.iters)
  ours = np.asarray(layer.apply({"params": params}, x))
  print(f"torch MixtralSparseMoeBlock forward {torch_seconds * 1e3:9.1f} ms; jax grouped is "
        f"x{torch_seconds / times['grouped'][0]:.2f} its speed (max |diff| {np.abs(ours - torch_out).max():.1e})")


if __name__ == "__main__":
  main()
