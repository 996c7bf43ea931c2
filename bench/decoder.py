"""LLaMA decoder: JAX train step and KV-cached greedy decoding vs transformers.LlamaForCausalLM (+ torch AdamW,
`generate`) on the same config, with the machine's f32 matmul roof and streaming bandwidth measured in the run.

Run:  flock /tmp/sphinx_heavy.lock python bench/decoder.py [--quick] [--iters 3] [--parts train,decode]
                                                           [--no-torch-compile] [--remat none|full|...]
Config M: vocab 32000, dim 1024, 8 layers, 16 heads (MHA), FFN 2816, seq 512, batch 4, float32.
Decode: prompt 128 tokens, 128 new tokens, batch 1 and 8 (`sphinx_jax.inference.decode.make_generate`).
--quick: a small smoke config (seconds).

Model FLOPs per train step (the MFU numerator): 6 * P_mm * B * T + 6 * L * B * T^2 * D, with P_mm the matmul
parameters (blocks + lm_head, not the embedding lookup) and the second term causal attention (QK^T and PV,
half the square). Roof: the best of jnp.dot (jit, precision 'highest') and torch.mm on n x n x n f32 GEMMs.
Bandwidth: the best of numpy, torch and XLA copies of a 256 MiB f32 array (bytes read + written).
Decode bound at batch 1: bandwidth / bytes read per token (all matmul weights + the KV cache).
Timings are the best of --iters runs after a warm-up (others share this machine; the best is the least noisy).
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers

from sphinx_jax import config as cfg
from sphinx_jax.inference.decode import for_decoding, make_generate
from sphinx_jax.models.llama import Llama

CONFIGS = {
    "M": dict(vocab=32000, dim=1024, layers=8, heads=16, ffn=2816, seq=512, batch=4, prompt=128, new=128,
              decode_batches=(1, 8), gemm=(2048, 4096)),
    "quick": dict(vocab=2048, dim=256, layers=2, heads=4, ffn=704, seq=128, batch=2, prompt=32, new=16,
                  decode_batches=(1, 2), gemm=(1024,)),
}


def best_time(fn, iters, warmup=1):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


# --- machine ----------------------------------------------------------------------------------------------

def matmul_roof(sizes, iters):
  """Best f32 GEMM FLOP/s of XLA and PyTorch over square sizes; returns (roof, {name: flops})."""
  results = {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(partial(jnp.dot, precision=jax.lax.Precision.HIGHEST))
    results[f"xla {n}"] = 2 * n ** 3 / best_time(lambda: dot(a, a).block_until_ready(), iters)
    t = torch.randn(n, n)
    results[f"torch {n}"] = 2 * n ** 3 / best_time(lambda: torch.mm(t, t), iters)
  return max(results.values()), results


def stream_bandwidth(iters, mib=256):
  """Best streaming bandwidth in bytes/s: copies (read + write, numpy and torch) and reductions (read only,
  torch and XLA, multi-threaded), so the decode bound uses what this machine can actually stream."""
  n = mib * 2 ** 20 // 4
  src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
  ts, td = torch.ones(n), torch.empty(n)
  x = jnp.ones(n, jnp.float32)
  total = jax.jit(jnp.sum)
  results = {"numpy copy": 2 * src.nbytes / best_time(lambda: np.copyto(dst, src), iters),
             "torch copy": 2 * src.nbytes / best_time(lambda: td.copy_(ts), iters),
             "torch sum": src.nbytes / best_time(lambda: ts.sum(), iters),
             "xla sum": src.nbytes / best_time(lambda: total(x).block_until_ready(), iters)}
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


def jax_train_step(c, iters, remat, ce):
  model = Llama(llm_of(c, remat_policy=remat))
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
    logits, _ = model.apply({"params": p}, toks[:, :-1], positions=positions)
    return cross_entropy(logits, toks[:, 1:], ce)

  @partial(jax.jit, donate_argnums=0)
  def step(state, toks):
    p, opt = state
    loss, grads = jax.value_and_grad(loss_fn)(p, toks)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  def run():
    nonlocal state
    state, loss = step(state, tokens)
    loss.block_until_ready()

  return best_time(run, iters)


def torch_train_step(c, iters, tuned):
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

  return best_time(run, iters, warmup=2 if tuned else 1)


# --- decoding ---------------------------------------------------------------------------------------------

def jax_decode(c, batch, iters, scan_layers):
  llm = llm_of(c, scan_layers=True)
  model = Llama(llm)
  prompt = jnp.asarray(np.random.default_rng(1).integers(0, c["vocab"], (batch, c["prompt"])), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(c["prompt"], dtype=jnp.int32), prompt.shape)
  params = jax.jit(lambda: model.init(jax.random.key(0), prompt, positions=positions))()["params"]
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                        is_leaf=lambda x: hasattr(x, "unbox"))
  if not scan_layers:
    model, params = for_decoding(model, params)
  generate = make_generate(model, c["new"])
  seconds = best_time(lambda: generate(params, prompt).block_until_ready(), iters)
  return batch * c["new"] / seconds


def hf_decode(c, batch, iters, tuned):
  torch.manual_seed(0)
  model = hf_model(c).eval()
  prompt = torch.randint(0, c["vocab"], (batch, c["prompt"]))
  kwargs = dict(max_new_tokens=c["new"], do_sample=False, attention_mask=torch.ones_like(prompt))
  if tuned:
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward)

  def run():
    with torch.inference_mode():
      out = model.generate(prompt, **kwargs)
    assert out.shape[1] == c["prompt"] + c["new"]

  return batch * c["new"] / best_time(run, iters, warmup=2 if tuned else 1)


def decode_bytes_per_token(c, batch):
  """Weights read once per step (shared by the batch) + each row's KV cache at the mean length."""
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
  args = parser.parse_args()
  jax.config.update("jax_default_matmul_precision", "highest")
  torch.backends.cuda.matmul.allow_tf32 = False
  c = CONFIGS["quick" if args.quick else "M"]
  parts = args.parts.split(",")
  print(f"config {'quick' if args.quick else 'M'}: {c}; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__} threads {torch.get_num_threads()}")

  roof, gemms = matmul_roof(c["gemm"], args.iters)
  bandwidth, copies = stream_bandwidth(args.iters)
  print("f32 GEMM GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in gemms.items())
        + f"  -> roof {roof / 1e9:.1f}", flush=True)
  print("stream GB/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in copies.items())
        + f"  -> bandwidth {bandwidth / 1e9:.1f}")

  if "train" in parts:
    flops = train_flops(c)
    print(f"train step: {flops / 1e12:.3f} TFLOP of model work", flush=True)
    runs = {"torch default (AdamW foreach)": partial(torch_train_step, c, args.iters, tuned=False)}
    if not args.no_torch_compile:
      runs["torch tuned (fused AdamW, torch.compile)"] = partial(torch_train_step, c, args.iters, tuned=True)
    for remat in dict.fromkeys([args.remat, "none"]):
      for ce in ("plain", "lse"):
        runs[f"jax remat={remat} ce={ce}"] = partial(jax_train_step, c, args.iters, remat, ce)
    best_torch = None
    for name, run in runs.items():  # torch first, so every JAX row can print its ratio at once
      seconds = run()
      best_torch = min(best_torch or seconds, seconds) if name.startswith("torch") else best_torch
      print(f"  {name:44s} {seconds:7.2f} s/step  {flops / seconds / 1e9:7.1f} GFLOP/s  "
            f"{flops / seconds / roof:6.1%} of roof  x{best_torch / seconds:.2f} vs best torch", flush=True)

  if "decode" in parts:
    print(f"decode: prompt {c['prompt']}, {c['new']} new tokens (tokens/s)", flush=True)
    for batch in c["decode_batches"]:
      runs = {"hf generate": partial(hf_decode, c, batch, args.iters, tuned=False)}
      if not args.no_torch_compile:
        runs["hf generate static cache + compile"] = partial(hf_decode, c, batch, args.iters, tuned=True)
      runs["jax scan layers"] = partial(jax_decode, c, batch, args.iters, True)
      runs["jax unscanned layers"] = partial(jax_decode, c, batch, args.iters, False)
      bound, best_hf = bandwidth / decode_bytes_per_token(c, batch) * batch, None
      for name, run in runs.items():
        rate = run()
        best_hf = max(best_hf or rate, rate) if name.startswith("hf") else best_hf
        print(f"  batch {batch} {name:36s} {rate:8.1f} tok/s  x{rate / best_hf:.2f} vs best HF  "
              f"{rate / bound:6.1%} of the bandwidth bound ({bound:.1f})", flush=True)

if __name__ == "__main__":
  main()
