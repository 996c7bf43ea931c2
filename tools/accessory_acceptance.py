"""Acceptance of our LLaMA2-Accessory export by the original `MetaModel.from_pretrained` (REFERENCES.md §2, §5).

Run:  python tools/accessory_acceptance.py /tmp/accessory_src [--variant sphinx|sphinx_1k|sphinx_tiny] [--mp 2]
      (the directory holding `accessory/`, e.g. `git archive HEAD accessory` of Alpha-VLLM/LLaMA2-Accessory;
      needs fairscale, open_clip 2.24, transformers 4.57, the PyPI `dinov2` package; runs on CPU with gloo).

The round trip, every weight random:
  1. the original `Transformer` of the variant's file is built by `MetaModel` (towers at their released widths,
     a few layers each, see `shrink_towers`; a tiny decoder) and every parameter is drawn at random; its state
     dict, bf16 and `llma.`-prefixed, is the source directory;
  2. `import_accessory` (our converter) reads it into our tree and our JAX `Sphinx` computes logits for an image
     and a prompt; `export_accessory` writes our tree back as an `--mp`-shard directory;
  3. a fresh `MetaModel.from_pretrained` loads the export. Accepted when it prints "all params match perfectly!",
     every loaded tensor equals the source bit for bit, and its logits are within 1e-4 of ours (fp32).
Prints one JSON line with the outcome (`accepted` true/false and the numbers) after the original's own output.

The original hard-codes the towers' widths (visual_proj takes 1024 + 3072 + 1536 channels) but builds them at
released depth, which does not fit a CPU box: `shrink_towers` patches the four constructors it calls to build
the same classes with fewer layers. DINOv2 comes from the PyPI `dinov2` package instead of torch.hub (offline).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import sphinx as presets
from sphinx_jax.convert.accessory import ACCESSORY_ARGS, export_accessory, import_accessory, shard_name
from sphinx_jax.models.sphinx import Sphinx

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "configs" / "assets" / "demo_tokenizer.model"
PERFECT = "all params match perfectly!"
TOLERANCE = 1e-4
# Depths of the shrunk towers; every width stays the released one.
CLIP_LAYERS, CONVNEXT_DEPTHS, DINOV2_DEPTH, EVA_LAYERS, QFORMER_LAYERS = 1, (1, 1, 1, 1), 1, 1, 2
DECODER = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32)  # GQA, as TinyLlama


# ------------------------------------------------------------------------------------------ the original
def shrink_towers(llm_module) -> None:
  """Makes `llm_module` (accessory.model.LLM.<llama_type>) build its towers at released widths, few layers.

  open_clip ViT-L-14: vision and (deleted) text transformer 1 layer; timm convnext_xxlarge: 1 block per stage;
  torch.hub dinov2_vitg14: the hub's ViT-g/14 (img 518, SwiGLU, LayerScale 1.0, no block chunks) at 1 block;
  BLIP-2 opt-2.7b config: EVA 1 layer, Q-Former 2 (one with cross-attention), a 1-layer OPT stand-in that the
  original deletes right after building it.
  """
  import open_clip
  import timm
  import transformers
  from dinov2.layers import MemEffAttention
  from dinov2.layers import NestedTensorBlock as Block
  from dinov2.models.vision_transformer import DinoVisionTransformer

  vit_l = open_clip.factory._MODEL_CONFIGS["ViT-L-14"]
  vit_l["vision_cfg"]["layers"] = vit_l["text_cfg"]["layers"] = CLIP_LAYERS

  create_model = timm.create_model

  def shallow_convnext(name, *args, **kwargs):
    if name == "convnext_xxlarge":
      kwargs["depths"] = CONVNEXT_DEPTHS
    return create_model(name, *args, **kwargs)

  open_clip.timm_model.timm.create_model = shallow_convnext

  def hub_load(repo, model, pretrained=True):
    assert (repo, model, pretrained) == ("facebookresearch/dinov2", "dinov2_vitg14", False), (repo, model)
    return DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=1536, depth=DINOV2_DEPTH, num_heads=24,
                                 mlp_ratio=4, block_fn=partial(Block, attn_class=MemEffAttention),
                                 ffn_layer="swiglufused", init_values=1.0, block_chunks=0)

  torch.hub.load = hub_load

  class ShallowBlip2Config(transformers.Blip2Config):
    @classmethod
    def from_pretrained(cls, path, **kwargs):
      config = transformers.Blip2Config.from_pretrained(path, **kwargs)
      config.vision_config.num_hidden_layers = EVA_LAYERS
      config.qformer_config.num_hidden_layers = QFORMER_LAYERS
      config.text_config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, ffn_dim=32, word_embed_proj_dim=16)
      return config

  if hasattr(llm_module, "Blip2Config"):
    llm_module.Blip2Config = ShallowBlip2Config


def start_gloo(workdir: Path) -> None:
  """A one-process gloo group and fairscale's model-parallel group of size 1, as `from_pretrained` makes."""
  import torch.distributed as dist
  from fairscale.nn.model_parallel import initialize as fs_init

  if not dist.is_initialized():
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{workdir / 'gloo'}")
  fs_init._MODEL_PARALLEL_GROUP = dist.new_group(ranks=[0])


@torch.no_grad()
def randomise(module, seed: int) -> None:
  """Every parameter random: norm weights 1 + N(0, 0.2) and biases N(0, 0.2); other matrices and kernels
  N(0, 1/fan_in); everything else (biases, LayerScale gammas, class/position/query/mask tokens, image tags)
  N(0, 0.5). Norms are found by class name, so the original's RMSNorm and timm's LayerNorm2d count."""
  gen = torch.Generator().manual_seed(seed)
  owners = dict(module.named_modules())
  for name, p in module.named_parameters():
    noise = torch.randn(p.shape, generator=gen)
    owner = type(owners[name.rpartition(".")[0]]).__name__
    if "Norm" in owner:
      p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
    elif p.ndim >= 2 and name.endswith("weight"):
      p.copy_(noise / math.sqrt(p[0].numel()))
    else:
      p.copy_(0.5 * noise)


def write_source(meta_model_cls, llama_type: str, directory: Path, seed: int) -> dict:
  """Builds the original model, randomises it, writes its bf16 `llma.` state as a 1-shard directory.

  Returns {key: bf16 tensor} of what was written, the reference for the reload.
  """
  from accessory.util.tensor_type import default_tensor_type

  args = {k: v for k, v in ACCESSORY_ARGS[llama_type].items() if k not in ("max_batch_size", "max_seq_len")}
  args.update(DECODER, vocab_size=-1)
  (directory / "config.json").write_text(json.dumps(args))
  (directory / "meta.json").write_text(json.dumps({"llama_type": llama_type}))
  (directory / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
  with default_tensor_type(dtype=torch.float32, device="cpu"):
    model = meta_model_cls(llama_type, [str(directory / "config.json")], str(directory / "tokenizer.model"),
                           with_visual=True, max_seq_len=512)
  randomise(model, seed)
  state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
  torch.save(state, directory / shard_name(0, 1))
  return state


def load_original(meta_model_cls, directory: Path):
  """`MetaModel.from_pretrained` on CPU in fp32; returns (model, the loader's printed output)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    model = meta_model_cls.from_pretrained(str(directory), with_visual=True, max_seq_len=512,
                                           dtype=torch.float32, device="cpu")
  return model, out.getvalue()


# ------------------------------------------------------------------------------------------------- ours
def our_config(variant: str):
  """The released variant's config with the shrunk towers' depths, fp32; the decoder comes from config.json."""
  config = presets.variant_config(variant)
  model = config.model
  model.dtype = "float32"
  model.clip.layers = CLIP_LAYERS
  model.convnext.depths = CONVNEXT_DEPTHS
  model.dinov2.depth = DINOV2_DEPTH
  model.qformer.vision.layers = EVA_LAYERS
  model.qformer.qformer.layers = QFORMER_LAYERS
  return config


def our_logits(params, config, tokens, image) -> np.ndarray:
  """float32[B, T, vocab] of our JAX model on fp32 copies of the (bf16) imported leaves."""
  params = {k: params[k] for k in ("llm", "towers", "fusion")}  # `extras` exist for export only
  params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32)), params)
  return np.asarray(jax.jit(Sphinx(config.model).apply)({"params": params}, tokens, image))


# ------------------------------------------------------------------------------------------- round trip
def round_trip(accessory_src, variant: str = "sphinx", mp: int = 1, workdir=None, seed: int = 0) -> dict:
  """Runs steps 1-3 of the module docstring; returns the outcome (see `main`)."""
  sys.path.insert(0, str(Path(accessory_src).resolve()))
  import importlib

  from accessory.model.meta import MetaModel

  llama_type = presets.LLAMA_TYPES[variant]
  shrink_towers(importlib.import_module(f"accessory.model.LLM.{llama_type}"))
  workdir = Path(workdir or tempfile.mkdtemp(prefix="accessory_acceptance_"))
  source, exported = workdir / "source", workdir / "exported"
  source.mkdir(parents=True, exist_ok=True)
  start_gloo(workdir)

  written = write_source(MetaModel, llama_type, source, seed)
  params, config, tokenizer = import_accessory(source, progress=False, config=our_config(variant))
  size = config.model.image_size
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(1, size, size, 3)).astype(np.float32)  # a CLIP-normalised-like input
  tokens = np.array([[1, *rng.integers(3, config.model.llm.vocab_size, 11)]], np.int32)
  ours = our_logits(params, config, tokens, image)
  export_accessory(params, config, tokenizer, exported, mp=mp, progress=False)
  del params

  model, printed = load_original(MetaModel, exported)
  loaded = {k: v.detach() for k, v in model.state_dict().items()}
  differing = sorted(k for k in written if k not in loaded or not torch.equal(loaded[k], written[k].float()))
  with torch.no_grad():
    theirs = model.llma(torch.from_numpy(tokens).long(), torch.from_numpy(image).permute(0, 3, 1, 2)).numpy()
  files = sorted(p.name for p in exported.iterdir())
  return dict(variant=variant, llama_type=llama_type, mp=mp, files=files, perfect=PERFECT in printed,
              load_result=[line for line in printed.splitlines() if "missing_keys" in line][-1:],
              tensors=len(loaded), source_tensors=len(written), differing=differing[:5],
              max_abs_logit_diff=float(np.abs(ours - theirs).max()), max_abs_logit=float(np.abs(theirs).max()),
              accepted=PERFECT in printed and not differing and float(np.abs(ours - theirs).max()) <= TOLERANCE)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("accessory_src", help="directory that holds the original's `accessory/` package")
  parser.add_argument("--variant", default="sphinx", choices=("sphinx", "sphinx_1k", "sphinx_tiny"))
  parser.add_argument("--mp", type=int, default=1, help="model-parallel shards of the export")
  parser.add_argument("--workdir", help="where the two checkpoint directories go (default: a temp dir)")
  args = parser.parse_args(argv)
  result = round_trip(args.accessory_src, args.variant, args.mp, args.workdir)
  print(json.dumps(result))
  return 0 if result["accepted"] else 1


if __name__ == "__main__":
  sys.exit(main())
