"""`sphinx-jax inspect`: key / shape / dtype lines for HF, LLaMA2-Accessory and Orbax checkpoints, read from
headers and metadata only; expected lines are derived from the tensors written in each test."""
import json

import numpy as np
import pytest
import torch

from configs.sphinx import get_config
from sphinx_jax import checkpoint
from sphinx_jax.cli import main
from sphinx_jax.convert import torch_io

from checkpoint_helpers import save_hf_dir, tiny_hf_llama


@pytest.fixture(autouse=True)
def no_tensor_reads(monkeypatch):
  """inspect must work from headers: reading any tensor's data fails the test."""
  for cls in (torch_io.SafetensorsFile, torch_io.PthFile):
    monkeypatch.setattr(cls, "read", lambda self, key: pytest.fail(f"inspect read tensor {key}"))


def inspect_lines(capsys, path) -> list[str]:
  assert main(["inspect", str(path)]) == 0
  return capsys.readouterr().out.splitlines()


def shape(t) -> str:
  return "[" + ", ".join(str(d) for d in t.shape) + "]"


def test_hf_sharded_dir(tmp_path, capsys):
  model = tiny_hf_llama()
  save_hf_dir(model, tmp_path, max_shard_size="100KB")
  state = model.state_dict()
  lines = inspect_lines(capsys, tmp_path)
  assert lines[0].startswith(f"hf: {tmp_path} (LlamaForCausalLM; 5 file(s): model-00001-of-00005.safetensors")
  assert sorted(lines[1:-1]) == sorted(f"{k}  {shape(v)}  float32" for k, v in state.items())
  assert "model.layers.1.self_attn.k_proj.weight  [32, 64]  float32" in lines
  n = sum(v.numel() for v in state.values())
  assert lines[-1] == f"total: {len(state)} tensors, {n:,} parameters, {4 * n:,} bytes"
  # natural order: layer 0 before layer 1, and 'lm_head' before 'model.'
  assert lines[1] == "lm_head.weight  [128, 64]  float32"


def test_accessory_dir_shows_each_shard(tmp_path, capsys):
  g = torch.Generator().manual_seed(0)
  full = {"llma.tok_embeddings.weight": torch.randn(32, 16, generator=g),   # split on dim 1
          "llma.layers.0.attention.wq.weight": torch.randn(16, 16, generator=g),  # column-parallel: dim 0
          "llma.layers.0.attention.wo.weight": torch.randn(16, 16, generator=g),  # row-parallel: dim 1
          "llma.norm.weight": torch.randn(16, generator=g)}                   # replicated
  split_dim = {"llma.tok_embeddings.weight": 1, "llma.layers.0.attention.wq.weight": 0,
               "llma.layers.0.attention.wo.weight": 1}
  shards = [{}, {}]
  for key, t in full.items():
    parts = torch.chunk(t, 2, dim=split_dim[key]) if key in split_dim else (t, t)
    for rank in (0, 1):
      shards[rank][key] = parts[rank].clone().to(torch.bfloat16)
  for rank in (0, 1):
    torch.save({"model": shards[rank]}, tmp_path / f"consolidated.{rank:02d}-of-02.model.pth")
  (tmp_path / "meta.json").write_text(json.dumps({"llama_type": "llama_ens_light"}))
  (tmp_path / "config.json").write_text(json.dumps({"dim": 16}))
  lines = inspect_lines(capsys, tmp_path)
  assert lines[0] == (f"accessory: {tmp_path} (llama_type llama_ens_light; 2 shard(s): "
                      "consolidated.00-of-02.model.pth, consolidated.01-of-02.model.pth)")
  assert lines[1:-1] == [
      "llma.layers.0.attention.wo.weight  [16, 8] [16, 8]  bfloat16",
      "llma.layers.0.attention.wq.weight  [8, 16] [8, 16]  bfloat16",
      "llma.norm.weight  [16] [16]  bfloat16",
      "llma.tok_embeddings.weight  [32, 8] [32, 8]  bfloat16",
  ]
  n = sum(t.numel() for s in shards for t in s.values())
  assert lines[-1] == f"total: 4 tensors, {n:,} parameters, {2 * n:,} bytes (summed over shards)"


def test_accessory_dir_with_a_missing_rank_is_refused(tmp_path, capsys):
  torch.save({"w": torch.ones(1)}, tmp_path / "consolidated.01-of-02.model.pth")
  assert main(["inspect", str(tmp_path)]) == 2
  assert "consolidated.00-of-02.model.pth: missing shard 0 of 2" in capsys.readouterr().err


def test_orbax_model_dir_and_bare_pytree(tmp_path, capsys):
  config = get_config("tiny_sphinx_tiny")
  params = {"llm": {"embed": {"embedding": np.zeros((16, 8), np.float32)},
                    "layers": {"mlp": {"up": {"kernel": np.zeros((2, 8, 24), np.float32)}}}},
            "fusion": {"start_img": np.zeros((1, 1, 8), np.float32)}}
  checkpoint.save_model_dir(tmp_path / "m", params, config, metadata={"source": "/src/x"})
  lines = inspect_lines(capsys, tmp_path / "m")
  assert lines[0].startswith(f"orbax model directory: {tmp_path / 'm'} (towers ['convnext', 'dinov2'], llm dim 64")
  assert lines[0].endswith("no tokenizer; from /src/x)")
  table = ["fusion/start_img  [1, 1, 8]  float32", "llm/embed/embedding  [16, 8]  float32",
           "llm/layers/mlp/up/kernel  [2, 8, 24]  float32"]
  assert lines[1:-1] == table
  assert lines[-1] == f"total: 3 tensors, {8 + 128 + 384:,} parameters, {4 * 520:,} bytes"
  bare = inspect_lines(capsys, tmp_path / "m" / "params")
  assert bare[0] == f"orbax pytree: {tmp_path / 'm' / 'params'}" and bare[1:-1] == table


def test_single_file_and_unknown_path(tmp_path, capsys):
  torch_io.save_safetensors_shards(tmp_path, [("x.weight", np.zeros((3, 5), np.float16))])
  assert inspect_lines(capsys, tmp_path / "model.safetensors")[1:] == [
      "x.weight  [3, 5]  float16", "total: 1 tensors, 15 parameters, 30 bytes"]
  (tmp_path / "empty").mkdir()
  assert main(["inspect", str(tmp_path / "empty")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"sphinx-jax inspect: error: {tmp_path / 'empty'}: no checkpoint")
